// Command echo-additional is an example chall-manager compatible scenario.
//
// It creates no resources: it echoes the additional configuration of the
// instance back as stack outputs, so that what the manager passed to the
// scenario can be checked from the outside.
package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/config"
)

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
	if additional == nil { // the value was JSON null
		additional = map[string]string{}
	}

	// encoding/json sorts map keys, so this is canonical (compact, sorted keys).
	canonical, err := json.Marshal(additional)
	if err != nil {
		return fmt.Errorf("serializing additional: %w", err)
	}

	flag := "CTF{echo-" + identity + "}"

	ctx.Export("connection_info", pulumi.String(string(canonical)))
	ctx.Export("flags", pulumi.ToStringArray([]string{flag}))
	ctx.Export("flag", pulumi.String(flag))
	ctx.Export("additional", pulumi.ToStringMap(additional))
	return nil
}
