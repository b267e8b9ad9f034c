// Command env-names is a test scenario: it exports the names (never the
// values) of the environment variables the program runs with, so a test can
// check that none of the worker's credentials reaches a scenario.
package main

import (
	"os"
	"sort"
	"strings"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/config"
)

func main() {
	pulumi.Run(program)
}

// envNames returns the sorted names of the process's environment variables.
func envNames() []string {
	names := []string{}
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// program exports `env_names` (an array) and, for chall-manager
// compatibility, `connection_info` (the names joined with commas) and a flag.
func program(ctx *pulumi.Context) error {
	identity := config.New(ctx, "").Get("identity")
	names := envNames()
	ctx.Export("env_names", pulumi.ToStringArray(names))
	ctx.Export("connection_info", pulumi.String(strings.Join(names, ",")))
	flag := "CTF{env-" + identity + "}"
	ctx.Export("flags", pulumi.ToSecret(pulumi.ToStringArray([]string{flag})))
	ctx.Export("flag", pulumi.ToSecret(pulumi.String(flag)))
	return nil
}
