// Command steps is an example chall-manager compatible scenario whose
// deployment takes several steps: it registers a chain of component
// resources, optionally pausing after each one or failing part-way, so that
// crash recovery and partial failures can be exercised without a cloud.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/config"
)

// step is one link of the chain: a component resource with no provider.
type step struct {
	pulumi.ResourceState
}

// intSetting reads a non-negative integer of the additional configuration.
func intSetting(additional map[string]string, key string, fallback int) (int, error) {
	raw, ok := additional[key]
	if !ok || raw == "" {
		return fallback, nil
	}
	v, err := strconv.Atoi(raw)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("additional %s must be a non-negative integer, got %q", key, raw)
	}
	return v, nil
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
		return fmt.Errorf("invalid configuration %s:additional: %w", ctx.Project(), err)
	}
	steps, err := intSetting(additional, "steps", 3)
	if err != nil {
		return err
	}
	pause, err := intSetting(additional, "step_ms", 0)
	if err != nil {
		return err
	}
	failAt, err := intSetting(additional, "fail_at", -1)
	if err != nil {
		return err
	}
	payloadKB, err := intSetting(additional, "payload_kb", 0)
	if err != nil {
		return err
	}
	// Each step's outputs carry this many KiB, the way a Kubernetes
	// resource's state holds its whole manifest: big states, few resources.
	block := identity + "-payload-block-"
	payload := strings.Repeat(block, payloadKB*1024/len(block)+1)[:payloadKB*1024]

	var previous pulumi.Resource
	for i := 0; i < steps; i++ {
		if i == failAt {
			return fmt.Errorf("step %d fails on purpose (identity %s)", i, identity)
		}
		s := &step{}
		opts := []pulumi.ResourceOption{}
		if previous != nil {
			opts = append(opts, pulumi.DependsOn([]pulumi.Resource{previous}))
		}
		if err := ctx.RegisterComponentResource("cm:example:Step", fmt.Sprintf("step-%d", i), s, opts...); err != nil {
			return err
		}
		outputs := pulumi.Map{"index": pulumi.Int(i)}
		if payloadKB > 0 {
			outputs["payload"] = pulumi.String(payload)
		}
		if err := ctx.RegisterResourceOutputs(s, outputs); err != nil {
			return err
		}
		previous = s
		time.Sleep(time.Duration(pause) * time.Millisecond)
	}

	sum := sha256.Sum256([]byte("steps-flag:" + identity))
	flag := "CTF{" + hex.EncodeToString(sum[:])[:16] + "}"
	ctx.Export("connection_info", pulumi.String(fmt.Sprintf("steps %s x%d", identity, steps)))
	ctx.Export("flags", pulumi.ToSecret(pulumi.ToStringArray([]string{flag})))
	ctx.Export("flag", pulumi.ToSecret(pulumi.String(flag)))
	return nil
}
