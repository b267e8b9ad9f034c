// The inputs and outputs of `localservice:index:TcpService` as Pulumi
// property maps.
//
// Inputs: `message` (string, required, handled as a secret: the flag) and
// `host` (string, an IP address to listen on, default 127.0.0.1).
// Outputs: the inputs (`message` kept secret) plus `port` and `pid`.

package main

import (
	"fmt"
	"net"

	"github.com/pulumi/pulumi/sdk/v3/go/common/resource"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
)

const (
	keyMessage  = "message"
	keyHost     = "host"
	keyPort     = "port"
	keyPid      = "pid"
	defaultHost = "127.0.0.1"
)

// inputs are a TcpService's checked inputs.
type inputs struct {
	message string
	host    string
	// known is false when an input is not known yet (during a preview).
	known bool
}

// unwrap strips secret markers.
func unwrap(v resource.PropertyValue) resource.PropertyValue {
	for v.IsSecret() {
		v = v.SecretValue().Element
	}
	return v
}

// checkInputs validates news, filling in defaults; it returns the checked
// property map (secretness of `message` preserved) and the failures.
func checkInputs(news resource.PropertyMap) (resource.PropertyMap, []*pulumirpc.CheckFailure) {
	var failures []*pulumirpc.CheckFailure
	fail := func(key, reason string) {
		failures = append(failures, &pulumirpc.CheckFailure{Property: key, Reason: reason})
	}
	checked := resource.PropertyMap{}

	message, ok := news[keyMessage]
	switch plain := unwrap(message); {
	case !ok || plain.IsNull():
		fail(keyMessage, "message is required (the text the service answers with)")
	case plain.IsComputed() || plain.IsOutput():
		checked[keyMessage] = resource.MakeSecret(plain)
	case !plain.IsString():
		fail(keyMessage, "message must be a string")
	case plain.StringValue() == "":
		fail(keyMessage, "message must not be empty")
	case len(plain.StringValue()) > maxMessageBytes:
		fail(keyMessage, fmt.Sprintf("message must be at most %d bytes", maxMessageBytes))
	default:
		// Always a secret: the message is a flag.
		checked[keyMessage] = resource.MakeSecret(plain)
	}

	host, ok := news[keyHost]
	switch plain := unwrap(host); {
	case !ok || plain.IsNull():
		checked[keyHost] = resource.NewStringProperty(defaultHost)
	case plain.IsComputed() || plain.IsOutput():
		checked[keyHost] = host
	case !plain.IsString():
		fail(keyHost, "host must be a string")
	case net.ParseIP(plain.StringValue()) == nil:
		fail(keyHost, fmt.Sprintf("host must be an IP address to listen on (e.g. %s), got %q", defaultHost, plain.StringValue()))
	default:
		checked[keyHost] = host
	}
	return checked, failures
}

// readInputs reads checked inputs (or stored outputs, which hold them too).
func readInputs(props resource.PropertyMap) (inputs, error) {
	in := inputs{known: true}
	for key, dst := range map[resource.PropertyKey]*string{keyMessage: &in.message, keyHost: &in.host} {
		v := unwrap(props[key])
		switch {
		case v.IsComputed() || v.IsOutput():
			in.known = false
		case v.IsString():
			*dst = v.StringValue()
		case key == keyHost && v.IsNull():
			*dst = defaultHost
		default:
			return inputs{}, fmt.Errorf("%s is missing or not a string", key)
		}
	}
	return in, nil
}

// readServer reads the server's pid and port from stored outputs.
func readServer(props resource.PropertyMap) (server, error) {
	var s server
	for key, dst := range map[resource.PropertyKey]*int{keyPid: &s.pid, keyPort: &s.port} {
		v := unwrap(props[key])
		if !v.IsNumber() {
			return server{}, fmt.Errorf("the stored state has no numeric %s", key)
		}
		*dst = int(v.NumberValue())
	}
	return s, nil
}

// outputsOf are the outputs of a running service.
func outputsOf(in inputs, s server) resource.PropertyMap {
	return resource.PropertyMap{
		keyMessage: resource.MakeSecret(resource.NewStringProperty(in.message)),
		keyHost:    resource.NewStringProperty(in.host),
		keyPort:    resource.NewNumberProperty(float64(s.port)),
		keyPid:     resource.NewNumberProperty(float64(s.pid)),
	}
}

// previewOutputs are the outputs of a service not created yet.
func previewOutputs(checked resource.PropertyMap) resource.PropertyMap {
	out := checked.Copy()
	unknown := resource.MakeComputed(resource.NewStringProperty(""))
	out[keyPort] = unknown
	out[keyPid] = unknown
	return out
}
