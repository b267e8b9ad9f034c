// Command tcp-flag is an example chall-manager compatible scenario that
// deploys a real network service per instance.
//
// It registers one `localservice:index:TcpService` (the provider plugin
// `pulumi-resource-localservice` built from providers/localservice): a
// detached TCP server on a free port of 127.0.0.1 that answers every
// connection with the instance's flag and a newline. It exports how to
// reach it and the flag, like the identity example.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/config"
)

// tcpServiceArgs is the shape of TcpService's inputs.
type tcpServiceArgs struct {
	Message string  `pulumi:"message"`
	Host    *string `pulumi:"host"`
}

// TcpServiceArgs are the inputs of a TcpService.
type TcpServiceArgs struct {
	// Message is what the service answers each connection with (secret).
	Message pulumi.StringInput
	// Host is the IP address to listen on (default 127.0.0.1).
	Host pulumi.StringPtrInput
}

// ElementType tells the SDK the shape of the inputs.
func (TcpServiceArgs) ElementType() reflect.Type {
	return reflect.TypeOf((*tcpServiceArgs)(nil)).Elem()
}

// TcpService is a running TCP service.
type TcpService struct {
	pulumi.CustomResourceState

	Host pulumi.StringOutput `pulumi:"host"`
	Port pulumi.IntOutput    `pulumi:"port"`
	Pid  pulumi.IntOutput    `pulumi:"pid"`
}

// flagFor derives the flag of an instance deterministically from its identity.
func flagFor(identity string) string {
	sum := sha256.Sum256([]byte("tcp-flag:" + identity))
	return "CTF{" + hex.EncodeToString(sum[:])[:16] + "}"
}

func main() {
	pulumi.Run(program)
}

// program is the Pulumi program of the scenario.
func program(ctx *pulumi.Context) error {
	cfg := config.New(ctx, "")

	identity := cfg.Get("identity")
	if identity == "" {
		return errors.New("missing configuration " + ctx.Project() + ":identity (the instance identity)")
	}

	additional := map[string]string{}
	if err := cfg.GetObject("additional", &additional); err != nil {
		return fmt.Errorf("invalid configuration %s:additional (want a JSON object of strings): %w", ctx.Project(), err)
	}

	flag := flagFor(identity)
	args := TcpServiceArgs{Message: pulumi.ToSecret(pulumi.String(flag)).(pulumi.StringOutput)}
	if host := additional["host"]; host != "" {
		args.Host = pulumi.StringPtr(host)
	}
	var svc TcpService
	err := ctx.RegisterResource("localservice:index:TcpService", "service", args, &svc,
		pulumi.AdditionalSecretOutputs([]string{"message"}))
	if err != nil {
		return err
	}

	ctx.Export("connection_info", pulumi.Sprintf("nc %s %d", svc.Host, svc.Port))
	ctx.Export("flags", pulumi.ToSecret(pulumi.ToStringArray([]string{flag})))
	ctx.Export("flag", pulumi.ToSecret(pulumi.String(flag)))
	return nil
}
