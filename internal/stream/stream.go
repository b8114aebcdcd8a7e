// Package stream is the framing of the shim's stream mode: requests come
// in on stdin, one per LF-terminated line, and each gets one reply line on
// stdout, in order: "N EXIT RESULT[ MESSAGE]".
//
// Lines that arrive together are handed to the handler as one batch, so
// that the shim takes its lock, writes its state and fsyncs its audit log
// once for many requests. This package judges nothing: it only frames,
// batches and bounds; the handler (package cli) judges every line exactly
// as one-shot mode does.
package stream

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// Request is one line of the stream.
type Request struct {
	// N is the line's number, counting from 1.
	N int
	// Line is the line without its LF, cut to Options.MaxLine+1 bytes
	// when it is longer: enough for the handler to deny it as too long.
	Line string
	// Len is the line's real length in bytes.
	Len int
	// Unterminated is set for bytes after the last LF at EOF: a request
	// the client may not have finished, which is never carried out.
	Unterminated bool
}

// Reply is what one request gets.
type Reply struct {
	Exit    int
	Result  string
	Message string
}

// Handler serves a batch of requests, in order. It returns one reply for
// each request it served, from the first on: at least one, and fewer than
// the batch when it stopped to bound the time it holds its lock. Requests
// it did not serve come again in the next batch.
type Handler func(batch []Request) []Reply

// Options bound a session.
type Options struct {
	// MaxLine is the longest request line, LF not counted.
	MaxLine int
	// MaxBatch is the most requests in one batch.
	MaxBatch int
	// Idle ends the session when no line has come for that long, and
	// when the client has not taken a batch's replies for that long: a
	// client that stops reading must not hold the session forever.
	Idle time.Duration
	// Stop, when closed, ends the session after the batch being served,
	// with its replies written (SIGTERM, SIGHUP).
	Stop <-chan struct{}
}

// ErrIdle ends a session that was idle for Options.Idle.
var ErrIdle = errors.New("the stream was idle")

// ErrStalled ends a session whose client did not take its replies within
// Options.Idle.
var ErrStalled = errors.New("the client did not read its replies")

// ErrStopped ends a session that was told to stop (Options.Stop).
var ErrStopped = errors.New("the session was told to stop")

// oneLine keeps a reply on one line, whatever its message holds.
var oneLine = strings.NewReplacer("\r\n", "; ", "\n", "; ", "\r", "; ")

// Format is a reply's line, LF included.
func Format(n int, r Reply) string {
	line := fmt.Sprintf("%d %d %s", n, r.Exit, r.Result)
	if msg := strings.TrimSpace(oneLine.Replace(r.Message)); msg != "" {
		line += " " + msg
	}
	return line + "\n"
}

// Serve reads requests from r until EOF or the idle timeout, hands them to
// h in batches, and writes each reply to w as soon as its batch is done.
// It returns nil at EOF, after every reply is written; ErrIdle after the
// idle timeout; the error when w or r fails.
func Serve(r io.Reader, w io.Writer, opt Options, h Handler) error {
	lines := make(chan Request, opt.MaxBatch)
	readErr := make(chan error, 1)
	go func() { readErr <- read(r, opt.MaxLine, lines) }()

	out := bufio.NewWriter(w)
	var pending []Request
	idle := time.NewTimer(opt.Idle)
	defer idle.Stop()
	open := true
	for open || len(pending) > 0 {
		if len(pending) == 0 {
			// Wait for the first line of the next batch.
			select {
			case req, ok := <-lines:
				if !ok {
					open = false
					continue
				}
				pending = append(pending, req)
			case <-idle.C:
				return ErrIdle
			case <-opt.Stop:
				return ErrStopped
			}
		}
		// Take whatever else has arrived, up to the bound.
	gather:
		for open && len(pending) < opt.MaxBatch {
			select {
			case req, ok := <-lines:
				if !ok {
					open = false
					break gather
				}
				pending = append(pending, req)
			default:
				break gather
			}
		}
		replies := h(pending)
		if len(replies) == 0 || len(replies) > len(pending) {
			return fmt.Errorf("stream: the handler served %d of %d requests", len(replies), len(pending))
		}
		if err := writeReplies(out, pending, replies, opt.Idle, opt.Stop); err != nil {
			return err
		}
		pending = pending[len(replies):]
		select {
		case <-opt.Stop:
			// Lines read and not served get no reply: the client sends
			// them again in its next session.
			return ErrStopped
		default:
		}
		if !idle.Stop() {
			select {
			case <-idle.C:
			default:
			}
		}
		idle.Reset(opt.Idle)
	}
	return <-readErr
}

// writeReplies writes a batch's replies, and gives up with ErrStalled
// when the client has not taken them within limit: a write to a full
// pipe blocks, and a client that stops reading would otherwise keep the
// session (and its sshd) forever. The write is left blocked; the caller
// ends the process. Once stop is closed, it waits stopGrace at most: a
// session told to stop must not outlive the signal by the idle timeout
// because its client does not read.
func writeReplies(out *bufio.Writer, reqs []Request, replies []Reply, limit time.Duration, stop <-chan struct{}) error {
	done := make(chan error, 1)
	go func() {
		for i, rep := range replies {
			if _, err := out.WriteString(Format(reqs[i].N, rep)); err != nil {
				done <- err
				return
			}
		}
		done <- out.Flush()
	}()
	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-timer.C:
		return ErrStalled
	case <-stop:
	}
	// Told to stop: a client that reads takes the replies at once.
	grace := time.NewTimer(min(stopGrace, limit))
	defer grace.Stop()
	select {
	case err := <-done:
		return err
	case <-grace.C:
		return ErrStopped
	}
}

// stopGrace is how long a session told to stop still waits for its
// client to take the batch's replies: a reading client takes them in
// milliseconds, and the package's prerm kills a session 5 s after its
// SIGTERM.
const stopGrace = 2 * time.Second

// read splits r into requests. A line longer than maxLine is read to its
// end and passed on cut, with its length, so that it is denied as one
// request and the next line is read as the next request.
func read(r io.Reader, maxLine int, lines chan<- Request) error {
	defer close(lines)
	br := bufio.NewReaderSize(r, 64<<10)
	n := 0
	for {
		var buf []byte
		length := 0
		for {
			chunk, err := br.ReadSlice('\n')
			length += len(chunk)
			if room := maxLine + 2 - len(buf); room > 0 {
				buf = append(buf, chunk[:min(len(chunk), room)]...)
			}
			if err == bufio.ErrBufferFull {
				continue
			}
			if err == io.EOF {
				if length > 0 {
					n++
					lines <- Request{N: n, Line: string(buf), Len: length, Unterminated: true}
				}
				return nil
			}
			if err != nil {
				return err
			}
			break
		}
		n++
		buf = bytes.TrimSuffix(buf, []byte("\n"))
		if len(buf) > maxLine {
			buf = buf[:maxLine+1]
		}
		lines <- Request{N: n, Line: string(buf), Len: length - 1}
	}
}
