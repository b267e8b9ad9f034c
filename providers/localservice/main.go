// Command pulumi-resource-localservice is a minimal Pulumi resource provider
// that runs real network services as detached processes on this machine.
//
// The Pulumi engine starts it as the plugin of package `localservice`
// (found as an ambient plugin on PATH) and talks to it over the
// ResourceProvider gRPC protocol. Its one resource,
// `localservice:index:TcpService`, is a TCP server listening on a free port
// of a loopback address that answers every connection with a message (the
// instance's flag) followed by a newline, then closes the connection.
//
// The same binary is the server: `pulumi-resource-localservice serve --port N`
// (started by Create, see process.go) serves one message until it is
// terminated. Layout:
//   - main.go: dispatch between provider mode and serve mode;
//   - provider.go: the gRPC ResourceProvider (Check, Diff, Create, Read, Delete, ...);
//   - props.go: inputs and outputs of TcpService as Pulumi property maps;
//   - process.go: starting, recognising and stopping a server process;
//   - serve.go: the server itself.
package main

import (
	"fmt"
	"os"

	"github.com/pulumi/pulumi/sdk/v3/go/pulumi/provider"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
)

const (
	// providerName is the Pulumi package this plugin serves.
	providerName = "localservice"
	// providerVersion is reported by GetPluginInfo and in the schema.
	providerVersion = "0.1.0"
	// binaryName is the plugin's executable name, also argv[0] of the servers
	// it starts, so that a server can be recognised in /proc/<pid>/cmdline.
	binaryName = "pulumi-resource-" + providerName
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == serveCommand {
		if err := serve(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "%s serve: %v\n", binaryName, err)
			os.Exit(1)
		}
		return
	}
	err := provider.Main(providerName, func(*provider.HostClient) (pulumirpc.ResourceProviderServer, error) {
		return newTCPServiceProvider(), nil
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", binaryName, err)
		os.Exit(1)
	}
}
