// The server mode: `pulumi-resource-localservice serve --port N`.
//
// Started by Create (process.go) in its own session with three inherited
// descriptors: fd 3 the already bound listening socket, fd 4 a pipe carrying
// the message (so that it never appears in the command line or the
// environment), fd 5 a pipe on which the server says it is ready. `--port` is
// informational: it lets Delete and Read recognise the server by its command
// line, and is checked against the socket.

package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

const (
	serveCommand = "serve"
	// The descriptors a server inherits (os/exec ExtraFiles start at 3).
	listenerFD = 3
	messageFD  = 4
	readyFD    = 5
	// readyLine is written on the ready pipe once the message is read.
	readyLine = "ready\n"
	// maxMessageBytes bounds the message (Check enforces it too).
	maxMessageBytes = 64 << 10
	// answerTimeout bounds the time spent on one connection.
	answerTimeout = 5 * time.Second
)

func serve(args []string) error {
	flags := flag.NewFlagSet(serveCommand, flag.ContinueOnError)
	port := flags.Int("port", 0, "the port of the inherited listening socket (a marker for process lookups)")
	_ = flags.String("owner", "", "the URN of the resource this server is (a marker for process lookups)")
	if err := flags.Parse(args); err != nil {
		return err
	}

	listenerFile := os.NewFile(listenerFD, "listener")
	ln, err := net.FileListener(listenerFile)
	_ = listenerFile.Close()
	if err != nil {
		return fmt.Errorf("fd %d is not a listening socket: %w", listenerFD, err)
	}
	if addr, ok := ln.Addr().(*net.TCPAddr); !ok || addr.Port != *port {
		return fmt.Errorf("the inherited socket listens on %v, not on port %d", ln.Addr(), *port)
	}

	messageFile := os.NewFile(messageFD, "message")
	message, err := io.ReadAll(io.LimitReader(messageFile, maxMessageBytes+1))
	_ = messageFile.Close()
	if err != nil {
		return fmt.Errorf("reading the message: %w", err)
	}
	if len(message) > maxMessageBytes {
		return fmt.Errorf("the message is longer than %d bytes", maxMessageBytes)
	}
	answer := append(message, '\n')

	readyFile := os.NewFile(readyFD, "ready")
	_, err = readyFile.WriteString(readyLine)
	_ = readyFile.Close()
	if err != nil {
		return fmt.Errorf("signalling readiness: %w", err)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	go func() {
		<-stop
		_ = ln.Close()
	}()

	for {
		conn, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			// Out of descriptors and the like: back off, keep serving.
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go answerOne(conn, answer)
	}
}

// answerOne writes the answer on conn and closes it.
func answerOne(conn net.Conn, answer []byte) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(answerTimeout))
	_, _ = conn.Write(answer)
}
