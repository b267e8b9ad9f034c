// The ResourceProvider gRPC server for `localservice:index:TcpService`.
//
// Lifecycle: Check validates and defaults the inputs; Diff replaces the
// service when `message` or `host` changes, and also when its server no
// longer runs (the worker never runs `pulumi refresh`, so an `up` on an
// instance whose server died brings a new one); Create starts a server;
// Read reports the resource gone when its server is; Delete stops the server
// (already gone is fine). Update is never planned: every change replaces.
//
// Secrets: the plugin accepts secrets, keeps `message` secret in its outputs
// and never writes the message to a log or an error.

package main

import (
	"context"
	"net"
	"strconv"

	"github.com/pulumi/pulumi/sdk/v3/go/common/resource"
	"github.com/pulumi/pulumi/sdk/v3/go/common/resource/plugin"
	"github.com/pulumi/pulumi/sdk/v3/go/common/util/logging"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
)

// tcpServiceType is the token of the one resource type.
const tcpServiceType = providerName + ":index:TcpService"

// schema is a minimal package schema describing TcpService.
const schema = `{
  "name": "` + providerName + `",
  "version": "` + providerVersion + `",
  "description": "TCP services on this machine's loopback, each a detached process answering every connection with a message",
  "resources": {
    "` + tcpServiceType + `": {
      "description": "A TCP server on a free port of host that answers each connection with message and a newline, then closes it",
      "inputProperties": {
        "message": {"type": "string", "secret": true},
        "host": {"type": "string", "default": "` + defaultHost + `"}
      },
      "requiredInputs": ["message"],
      "properties": {
        "message": {"type": "string", "secret": true},
        "host": {"type": "string"},
        "port": {"type": "integer"},
        "pid": {"type": "integer"}
      },
      "required": ["message", "host", "port", "pid"]
    }
  }
}`

type tcpServiceProvider struct {
	pulumirpc.UnimplementedResourceProviderServer
}

func newTCPServiceProvider() *tcpServiceProvider { return &tcpServiceProvider{} }

var (
	// Properties are read with their secret and unknown markers kept.
	unmarshalOpts = plugin.MarshalOptions{KeepUnknowns: true, KeepSecrets: true, SkipNulls: true}
	marshalOpts   = plugin.MarshalOptions{KeepUnknowns: true, KeepSecrets: true}
)

func unmarshal(s *structpb.Struct, label string) (resource.PropertyMap, error) {
	opts := unmarshalOpts
	opts.Label = label
	props, err := plugin.UnmarshalProperties(s, opts)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "%s: %v", label, err)
	}
	return props, nil
}

func marshal(props resource.PropertyMap, label string) (*structpb.Struct, error) {
	opts := marshalOpts
	opts.Label = label
	out, err := plugin.MarshalProperties(props, opts)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "%s: %v", label, err)
	}
	return out, nil
}

func checkType(urn string) error {
	if t := string(resource.URN(urn).Type()); t != tcpServiceType {
		return status.Errorf(codes.InvalidArgument, "unknown resource type %q (this provider has only %s)", t, tcpServiceType)
	}
	return nil
}

func (p *tcpServiceProvider) GetPluginInfo(context.Context, *emptypb.Empty) (*pulumirpc.PluginInfo, error) {
	return &pulumirpc.PluginInfo{Version: providerVersion}, nil
}

func (p *tcpServiceProvider) GetSchema(context.Context, *pulumirpc.GetSchemaRequest) (*pulumirpc.GetSchemaResponse, error) {
	return &pulumirpc.GetSchemaResponse{Schema: schema}, nil
}

// CheckConfig accepts any provider configuration: there is none to use.
func (p *tcpServiceProvider) CheckConfig(_ context.Context, req *pulumirpc.CheckRequest) (*pulumirpc.CheckResponse, error) {
	return &pulumirpc.CheckResponse{Inputs: req.GetNews()}, nil
}

func (p *tcpServiceProvider) DiffConfig(context.Context, *pulumirpc.DiffRequest) (*pulumirpc.DiffResponse, error) {
	return &pulumirpc.DiffResponse{Changes: pulumirpc.DiffResponse_DIFF_NONE}, nil
}

func (p *tcpServiceProvider) Configure(context.Context, *pulumirpc.ConfigureRequest) (*pulumirpc.ConfigureResponse, error) {
	return &pulumirpc.ConfigureResponse{AcceptSecrets: true, SupportsPreview: true}, nil
}

func (p *tcpServiceProvider) Cancel(context.Context, *emptypb.Empty) (*emptypb.Empty, error) {
	return &emptypb.Empty{}, nil
}

func (p *tcpServiceProvider) Check(_ context.Context, req *pulumirpc.CheckRequest) (*pulumirpc.CheckResponse, error) {
	if err := checkType(req.GetUrn()); err != nil {
		return nil, err
	}
	news, err := unmarshal(req.GetNews(), "check.news")
	if err != nil {
		return nil, err
	}
	checked, failures := checkInputs(news)
	if len(failures) > 0 {
		return &pulumirpc.CheckResponse{Inputs: req.GetNews(), Failures: failures}, nil
	}
	out, err := marshal(checked, "check.inputs")
	if err != nil {
		return nil, err
	}
	return &pulumirpc.CheckResponse{Inputs: out}, nil
}

func (p *tcpServiceProvider) Diff(_ context.Context, req *pulumirpc.DiffRequest) (*pulumirpc.DiffResponse, error) {
	if err := checkType(req.GetUrn()); err != nil {
		return nil, err
	}
	olds, err := unmarshal(req.GetOlds(), "diff.olds")
	if err != nil {
		return nil, err
	}
	news, err := unmarshal(req.GetNews(), "diff.news")
	if err != nil {
		return nil, err
	}
	var changed []string
	for _, key := range []resource.PropertyKey{keyMessage, keyHost} {
		o, n := unwrap(olds[key]), unwrap(news[key])
		if n.IsComputed() || n.IsOutput() || !o.DeepEquals(n) {
			changed = append(changed, string(key))
		}
	}
	replaces := append([]string(nil), changed...)
	if s, err := readServer(olds); err != nil || !isRunning(s) {
		logging.V(5).Infof("%s: the server of %s no longer runs; replacing it", binaryName, req.GetUrn())
		replaces = append(replaces, keyPid)
	}
	if len(replaces) == 0 {
		return &pulumirpc.DiffResponse{Changes: pulumirpc.DiffResponse_DIFF_NONE}, nil
	}
	// Delete before replace: the new server's Create must find no other
	// server of this resource alive (see Create).
	return &pulumirpc.DiffResponse{
		Changes:             pulumirpc.DiffResponse_DIFF_SOME,
		Diffs:               replaces,
		Replaces:            replaces,
		DeleteBeforeReplace: true,
	}, nil
}

func (p *tcpServiceProvider) Create(_ context.Context, req *pulumirpc.CreateRequest) (*pulumirpc.CreateResponse, error) {
	if err := checkType(req.GetUrn()); err != nil {
		return nil, err
	}
	props, err := unmarshal(req.GetProperties(), "create.properties")
	if err != nil {
		return nil, err
	}
	in, err := readInputs(props)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create: %v", err)
	}
	if req.GetPreview() {
		out, err := marshal(previewOutputs(props), "create.preview")
		if err != nil {
			return nil, err
		}
		return &pulumirpc.CreateResponse{Properties: out}, nil
	}
	if !in.known {
		return nil, status.Error(codes.InvalidArgument, "create: message and host must be known")
	}
	// A server already running for this resource was started by a run that
	// died before recording it (its create left pending, cleared by the
	// next run): nothing else can ever stop it. Replacements delete the old
	// server first (Diff), so no live resource's server is taken for one.
	for _, stray := range serversOf(req.GetUrn()) {
		logging.V(5).Infof("%s: stopping server pid %d port %d an interrupted run left for %s", binaryName, stray.pid, stray.port, req.GetUrn())
		if err := stopServer(stray); err != nil {
			return nil, status.Errorf(codes.Unavailable, "create: %v", err)
		}
	}
	s, err := startServer(in.host, in.message, req.GetUrn())
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "create: %v", err)
	}
	logging.V(5).Infof("%s: started server pid %d on %s port %d", binaryName, s.pid, in.host, s.port)
	out, err := marshal(outputsOf(in, s), "create.outputs")
	if err != nil {
		_ = stopServer(s)
		return nil, err
	}
	return &pulumirpc.CreateResponse{Id: resourceID(in.host, s.port), Properties: out}, nil
}

func (p *tcpServiceProvider) Read(_ context.Context, req *pulumirpc.ReadRequest) (*pulumirpc.ReadResponse, error) {
	if err := checkType(req.GetUrn()); err != nil {
		return nil, err
	}
	props, err := unmarshal(req.GetProperties(), "read.properties")
	if err != nil {
		return nil, err
	}
	s, err := readServer(props)
	if err != nil || !isRunning(s) {
		// Gone: an empty id tells the engine the resource no longer exists.
		return &pulumirpc.ReadResponse{}, nil
	}
	return &pulumirpc.ReadResponse{
		Id:         req.GetId(),
		Properties: req.GetProperties(),
		Inputs:     req.GetInputs(),
	}, nil
}

func (p *tcpServiceProvider) Update(_ context.Context, req *pulumirpc.UpdateRequest) (*pulumirpc.UpdateResponse, error) {
	return nil, status.Errorf(codes.FailedPrecondition,
		"%s has no property that changes in place; Diff always plans a replacement (urn %s)", tcpServiceType, req.GetUrn())
}

func (p *tcpServiceProvider) Delete(_ context.Context, req *pulumirpc.DeleteRequest) (*emptypb.Empty, error) {
	if err := checkType(req.GetUrn()); err != nil {
		return nil, err
	}
	props, err := unmarshal(req.GetProperties(), "delete.properties")
	if err != nil {
		return nil, err
	}
	s, err := readServer(props)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "delete %s: %v", req.GetId(), err)
	}
	if err := stopServer(s); err != nil {
		return nil, status.Errorf(codes.Internal, "delete %s: %v", req.GetId(), err)
	}
	logging.V(5).Infof("%s: stopped server pid %d port %d", binaryName, s.pid, s.port)
	return &emptypb.Empty{}, nil
}

// resourceID is the id of the service listening on host:port.
func resourceID(host string, port int) string {
	return net.JoinHostPort(host, strconv.Itoa(port))
}

var _ pulumirpc.ResourceProviderServer = (*tcpServiceProvider)(nil)
