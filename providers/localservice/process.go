// Server processes: starting one detached (its own session and process
// group, stdio on /dev/null, an empty environment, so that it outlives this
// plugin and the pulumi run, and the engine's kill of the plugin's process
// group does not reach it), recognising one by its command line, and
// stopping one (SIGTERM, then SIGKILL).

package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	// readyTimeout bounds the wait for a new server to read its message.
	readyTimeout = 10 * time.Second
	// termGrace is how long a server has to exit after SIGTERM.
	termGrace = 5 * time.Second
	// killGrace is how long to wait for the exit after SIGKILL.
	killGrace = 2 * time.Second
	// pollInterval is how often a stopping server is looked at.
	pollInterval = 20 * time.Millisecond
)

// server is a started server process.
type server struct {
	pid  int
	port int
}

// startServer binds a free port on host, then starts a detached server
// process that inherits the socket and answers every connection with
// message, marked on its command line as the server of owner (the
// resource's URN). It returns once the server has read its message.
func startServer(host, message, owner string) (server, error) {
	exe, err := os.Executable()
	if err != nil {
		return server{}, fmt.Errorf("finding this executable: %w", err)
	}
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP(host), Port: 0})
	if err != nil {
		return server{}, fmt.Errorf("listening on %s: %w", host, err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	listenerFile, err := ln.File()
	if err != nil {
		return server{}, fmt.Errorf("duplicating the listening socket: %w", err)
	}
	defer listenerFile.Close()

	messageR, messageW, err := os.Pipe()
	if err != nil {
		return server{}, fmt.Errorf("creating the message pipe: %w", err)
	}
	defer messageR.Close()
	defer messageW.Close()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return server{}, fmt.Errorf("creating the ready pipe: %w", err)
	}
	defer readyR.Close()
	defer readyW.Close()

	cmd := &exec.Cmd{
		Path:        exe,
		Args:        serverArgs(port, owner),
		Env:         []string{},
		Dir:         "/",
		ExtraFiles:  []*os.File{listenerFile, messageR, readyW},
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	if err := cmd.Start(); err != nil {
		return server{}, fmt.Errorf("starting the server: %w", err)
	}
	// Reap the server if it exits while this plugin still runs; once the
	// plugin exits, the server is re-parented and reaped by its new parent.
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	// The child holds its own copies now.
	_ = messageR.Close()
	_ = readyW.Close()
	_ = listenerFile.Close()

	fail := func(err error) (server, error) {
		_ = cmd.Process.Kill()
		<-exited
		return server{}, err
	}
	if _, err := messageW.WriteString(message); err != nil {
		return fail(fmt.Errorf("handing the message to the server: %w", err))
	}
	if err := messageW.Close(); err != nil {
		return fail(fmt.Errorf("handing the message to the server: %w", err))
	}
	_ = readyR.SetReadDeadline(time.Now().Add(readyTimeout))
	line, err := bufio.NewReader(readyR).ReadString('\n')
	if err != nil || line != readyLine {
		return fail(fmt.Errorf("the server did not become ready (it exited or took over %v)", readyTimeout))
	}
	return server{pid: cmd.Process.Pid, port: port}, nil
}

// serverArgs is the command line of the server listening on port for
// owner (none: the form servers started before owners were recorded have).
func serverArgs(port int, owner string) []string {
	args := []string{binaryName, serveCommand, "--port", strconv.Itoa(port)}
	if owner != "" {
		args = append(args, "--owner", owner)
	}
	return args
}

// commandLine is the arguments of pid, or nil when it is gone.
func commandLine(pid int) []string {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(cmdline) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
}

// serverOf reads a server's command line: its port and owner, and whether
// args is one at all.
func serverOf(args []string) (port int, owner string, ok bool) {
	if len(args) != 4 && len(args) != 6 {
		return 0, "", false
	}
	if filepath.Base(args[0]) != binaryName || args[1] != serveCommand || args[2] != "--port" {
		return 0, "", false
	}
	port, err := strconv.Atoi(args[3])
	if err != nil {
		return 0, "", false
	}
	if len(args) == 6 {
		if args[4] != "--owner" {
			return 0, "", false
		}
		owner = args[5]
	}
	return port, owner, true
}

// isRunning tells whether pid is a live (not zombie) server of ours
// listening on port, judged by its command line, so that a recycled pid is
// never taken for our server.
func isRunning(s server) bool {
	if s.pid <= 0 {
		return false
	}
	port, _, ok := serverOf(commandLine(s.pid))
	return ok && port == s.port && !isZombie(s.pid)
}

// serversOf lists the live servers whose command line names owner.
func serversOf(owner string) []server {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var found []server
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		port, o, ok := serverOf(commandLine(pid))
		if ok && o == owner && !isZombie(pid) {
			found = append(found, server{pid: pid, port: port})
		}
	}
	return found
}

// isZombie tells whether pid has exited but is not reaped yet (a zombie's
// command line is empty anyway; this covers the window in between).
func isZombie(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// Format: "pid (comm) S ...", comm may hold spaces and parentheses.
	end := strings.LastIndexByte(string(stat), ')')
	if end < 0 || end+2 >= len(stat) {
		return false
	}
	state := stat[end+2]
	return state == 'Z' || state == 'X'
}

// stopServer stops the server if it still runs: SIGTERM, then SIGKILL after
// termGrace. A server that is already gone (or a pid that is no longer ours)
// is not an error.
func stopServer(s server) error {
	for _, step := range []struct {
		signal syscall.Signal
		grace  time.Duration
	}{{syscall.SIGTERM, termGrace}, {syscall.SIGKILL, killGrace}} {
		if !isRunning(s) {
			return nil
		}
		if err := syscall.Kill(s.pid, step.signal); err != nil {
			if errors.Is(err, syscall.ESRCH) {
				return nil
			}
			return fmt.Errorf("signalling server pid %d: %w", s.pid, err)
		}
		deadline := time.Now().Add(step.grace)
		for time.Now().Before(deadline) {
			if !isRunning(s) {
				return nil
			}
			time.Sleep(pollInterval)
		}
	}
	if isRunning(s) {
		return fmt.Errorf("server pid %d (port %d) still runs after SIGKILL", s.pid, s.port)
	}
	return nil
}
