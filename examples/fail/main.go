// Command fail is an example chall-manager compatible scenario that always
// fails, to exercise how the instance manager reports scenario errors.
package main

import (
	"fmt"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/config"
)

func main() {
	pulumi.Run(program)
}

// program is the Pulumi program of the scenario.
func program(ctx *pulumi.Context) error {
	identity := config.New(ctx, "").Get("identity")
	return fmt.Errorf("this scenario fails on purpose (identity %s)", identity)
}
