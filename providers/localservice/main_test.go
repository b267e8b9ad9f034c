// Unit tests of the provider: real server processes on loopback (the test
// binary re-executes itself in serve mode), input checking, the schema.

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/pulumi/pulumi/sdk/v3/go/common/resource"
	pulumirpc "github.com/pulumi/pulumi/sdk/v3/proto/go"
)

// TestMain lets startServer re-execute the test binary as a server.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == serveCommand {
		if err := serve(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func readLine(t *testing.T, port int) (string, error) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	return bufio.NewReader(conn).ReadString('\n')
}

func TestServerAnswersEveryConnectionThenStops(t *testing.T) {
	s, err := startServer("127.0.0.1", "CTF{unit}", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stopServer(s) })
	if !isRunning(s) {
		t.Fatalf("server %+v not recognised as running", s)
	}
	for i := 0; i < 3; i++ {
		line, err := readLine(t, s.port)
		if err != nil || line != "CTF{unit}\n" {
			t.Fatalf("connection %d: got %q, %v", i, line, err)
		}
	}
	if err := stopServer(s); err != nil {
		t.Fatal(err)
	}
	if isRunning(s) {
		t.Fatal("server still running after stopServer")
	}
	if _, err := readLine(t, s.port); err == nil {
		t.Fatal("the port still answers after stopServer")
	}
	if err := stopServer(s); err != nil {
		t.Fatalf("stopping a stopped server: %v", err)
	}
}

func TestAForeignProcessIsNeverTakenForAServer(t *testing.T) {
	sleeper := exec.Command("sleep", "30")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sleeper.Process.Kill(); _ = sleeper.Wait() })
	foreign := server{pid: sleeper.Process.Pid, port: 1}
	if isRunning(foreign) {
		t.Fatal("sleep taken for a server")
	}
	if err := stopServer(foreign); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if isZombie(sleeper.Process.Pid) {
		t.Fatal("stopServer killed a foreign process")
	}
	if isRunning(server{pid: 999999999, port: 1}) {
		t.Fatal("a missing pid taken for a server")
	}
}

func TestCheckDefaultsHostAndKeepsTheMessageSecret(t *testing.T) {
	checked, failures := checkInputs(resource.PropertyMap{keyMessage: resource.NewStringProperty("CTF{x}")})
	if len(failures) != 0 {
		t.Fatalf("failures: %v", failures)
	}
	if !checked[keyMessage].IsSecret() || unwrap(checked[keyMessage]).StringValue() != "CTF{x}" {
		t.Fatalf("message not kept as a secret: %v", checked[keyMessage].IsSecret())
	}
	if checked[keyHost].StringValue() != defaultHost {
		t.Fatalf("host %v", checked[keyHost])
	}
}

func TestCheckRejectsBadInputs(t *testing.T) {
	for name, news := range map[string]resource.PropertyMap{
		"no message":    {},
		"empty message": {keyMessage: resource.NewStringProperty("")},
		"not a string":  {keyMessage: resource.NewNumberProperty(1)},
		"bad host":      {keyMessage: resource.NewStringProperty("m"), keyHost: resource.NewStringProperty("localhost:1")},
	} {
		if _, failures := checkInputs(news); len(failures) != 1 {
			t.Errorf("%s: want one failure, got %v", name, failures)
		}
	}
}

func TestSchemaIsJSON(t *testing.T) {
	var v map[string]any
	if err := json.Unmarshal([]byte(schema), &v); err != nil {
		t.Fatal(err)
	}
	if _, ok := v["resources"].(map[string]any)[tcpServiceType]; !ok {
		t.Fatalf("schema lacks %s", tcpServiceType)
	}
}

// A run that died after its Create started a server, before the engine
// recorded the resource, leaves that server running; the next run's Create
// of the same resource (the pending create cleared) must stop it rather
// than leave a service no state names. Another resource's server stays.
func TestCreateStopsTheServerAnInterruptedRunLeftForTheSameResource(t *testing.T) {
	const urn = "urn:pulumi:s1::p::localservice:index:TcpService::svc"
	const other = "urn:pulumi:s2::p::localservice:index:TcpService::svc"
	stray, err := startServer("127.0.0.1", "CTF{stray}", urn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stopServer(stray) })
	kept, err := startServer("127.0.0.1", "CTF{other}", other)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stopServer(kept) })

	props, err := marshal(resource.PropertyMap{
		keyMessage: resource.NewStringProperty("CTF{new}"),
		keyHost:    resource.NewStringProperty("127.0.0.1"),
	}, "test")
	if err != nil {
		t.Fatal(err)
	}
	resp, err := newTCPServiceProvider().Create(context.Background(), &pulumirpc.CreateRequest{Urn: urn, Properties: props})
	if err != nil {
		t.Fatal(err)
	}
	outs, err := unmarshal(resp.GetProperties(), "test")
	if err != nil {
		t.Fatal(err)
	}
	created, err := readServer(outs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stopServer(created) })

	if isRunning(stray) {
		t.Fatalf("the interrupted run's server %+v still runs", stray)
	}
	if !isRunning(kept) {
		t.Fatalf("another resource's server %+v was stopped", kept)
	}
	if line, err := readLine(t, created.port); err != nil || line != "CTF{new}\n" {
		t.Fatalf("the new server answers %q, %v", line, err)
	}
	if servers := serversOf(urn); len(servers) != 1 || servers[0] != created {
		t.Fatalf("servers of %s: %+v, want only %+v", urn, servers, created)
	}
}
