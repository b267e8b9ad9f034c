// Command identity is an example chall-manager compatible scenario.
//
// It creates no resources: from the instance identity it derives a
// connection string and a deterministic flag, and exports them as stack
// outputs (the flags as secrets, so that secret decoding is exercised).
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/config"
)

// connectionInfo builds the connection string of the instance, prefixed by
// the optional "connection_prefix" of the additional configuration.
func connectionInfo(identity string, additional map[string]string) string {
	return additional["connection_prefix"] + fmt.Sprintf("nc %s.ctf.local 1337", identity)
}

// flagFor derives the flag of an instance deterministically from its identity.
func flagFor(identity string) string {
	sum := sha256.Sum256([]byte("identity-flag:" + identity))
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

	flags := []string{flagFor(identity)}

	ctx.Export("connection_info", pulumi.String(connectionInfo(identity, additional)))
	ctx.Export("flags", pulumi.ToSecret(pulumi.ToStringArray(flags)))
	ctx.Export("flag", pulumi.ToSecret(pulumi.String(flags[0])))
	return nil
}
