package mesh

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/skybridge-mesh/skybridge/migrate"
)

// The control endpoint is HTTP over a unix socket that only the gateway's
// user can open (0600, in a directory of that user or root that not every
// user may write): file permissions are its authentication, as for the
// Docker and containerd sockets.

func (g *Gateway) serveControl() (io.Closer, error) {
	path, err := filepath.Abs(g.s.ControlSocket)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", g.s.ControlSocket, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	// In a directory another user may write, or owns, that user could put
	// a socket of theirs at the path while the gateway is down, and be
	// sent what the CLI sends: policies, Vault tokens for bursts. So could
	// one who may replace any directory on the way to it, or a symbolic
	// link on the way. A group may write it under umask 002, where each
	// user has a group of their own: that is only said.
	dir, err := controlDir(filepath.Dir(path), os.Geteuid(), false, g.log)
	if err != nil {
		return nil, err
	}
	// Sticky is not enough for the socket's own directory: while the
	// gateway is down there is no socket, and anyone may make one.
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if fi.Mode().Perm()&0o002 != 0 {
		return nil, fmt.Errorf("control socket directory %s may be written by any user (mode %v): one could take the socket's place; run chmod o-w on it, or set control { socket = \"…\" } in a directory of the gateway's own", dir, fi.Mode().Perm())
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use: is another gateway running with this state directory?", path)
	}
	// What nothing answers at is a socket a gateway left behind, or not
	// a socket at all: a control { socket = … } naming a file of the
	// state directory would delete it.
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("control socket %s: a %s is there, not a socket; set control { socket = \"…\" } to a path of its own, or move it away", path, fileKind(fi.Mode()))
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket %s: remove the one a gateway left: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// Created 0600 (no moment when others may connect), rather than
	// changed after: a chmod by path follows whatever is at the path by
	// then.
	old := umask(0o177)
	ln, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm()&0o077 != 0 {
		ln.Close()
		return nil, fmt.Errorf("control socket %s is not a socket only this user may use (%v): is something else changing the directory %s?", path, err, filepath.Dir(path))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := g.Status()
		reply(w, st, err)
	})
	mux.HandleFunc("GET /v1/graph", g.serveGraph)
	mux.HandleFunc("GET /v1/operator", func(w http.ResponseWriter, r *http.Request) {
		l, err := g.operatorLink()
		reply(w, l, err)
	})
	mux.HandleFunc("POST /v1/policy", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Policy, Signature []byte }
		if err := decodeRequest(r.Body, 4<<20).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		adopted, err := g.AdoptPolicy(req.Policy, req.Signature)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		reply(w, map[string]any{"adopted": adopted, "policy": g.policyRevision()}, nil)
	})
	mux.HandleFunc("POST /v1/keys/rotate-wg", func(w http.ResponseWriter, r *http.Request) {
		rep, err := g.RotateWireGuardKey(r.Context())
		reply(w, rep, err)
	})
	mux.HandleFunc("POST /v1/keys/rotate-gossip", func(w http.ResponseWriter, r *http.Request) {
		rep, err := g.RotateGossipKey(r.Context(), r.URL.Query().Get("force") == "1")
		reply(w, rep, err)
	})
	mux.HandleFunc("POST /v1/migrations", func(w http.ResponseWriter, r *http.Request) {
		var req MigrationRequest
		if err := decodeRequest(r.Body, 1<<20).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		g.streamMigration(w, r, req)
	})
	mux.HandleFunc("POST /v1/migrations/{id}/resume", func(w http.ResponseWriter, r *http.Request) {
		// A resume may set the pace anew (an apply run again with
		// another --bwlimit); the rest is the migration's own. A client
		// of an earlier release sends no body, or null.
		var pace MigrationRequest
		if err := decodeRequest(r.Body, 1<<20).Decode(&pace); err != nil && !errors.Is(err, io.EOF) {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		g.streamMigration(w, r, MigrationRequest{ID: r.PathValue("id"), Streams: pace.Streams, BWLimit: pace.BWLimit})
	})
	mux.HandleFunc("POST /v1/migrations/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
		reply(w, map[string]string{"cancelled": r.PathValue("id")}, g.CancelMigration(r.PathValue("id")))
	})
	mux.HandleFunc("POST /v1/plan", func(w http.ResponseWriter, r *http.Request) {
		var req PlanRequest
		if err := decodeRequest(r.Body, 16<<20).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		p, err := g.Plan(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		reply(w, p, nil)
	})
	mux.HandleFunc("POST /v1/bursts", func(w http.ResponseWriter, r *http.Request) {
		var req BurstRequest
		if err := decodeRequest(r.Body, 1<<20).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		grant, err := g.BurstUp(r.Context(), req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		reply(w, grant, nil)
	})
	mux.HandleFunc("GET /v1/bursts", func(w http.ResponseWriter, r *http.Request) {
		l, err := g.Bursts()
		reply(w, l, err)
	})
	mux.HandleFunc("POST /v1/bursts/{site}/down", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			VaultToken string `json:"vault_token"`
		}
		if err := decodeRequest(r.Body, 64<<10).Decode(&req); err != nil && !errors.Is(err, io.EOF) {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		bi, err := g.BurstDown(r.Context(), r.PathValue("site"), req.VaultToken)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		reply(w, bi, nil)
	})
	mux.HandleFunc("GET /v1/migrations", func(w http.ResponseWriter, r *http.Request) {
		l, err := g.Migrations()
		reply(w, l, err)
	})
	mux.HandleFunc("GET /v1/migrations/{id}", func(w http.ResponseWriter, r *http.Request) {
		rec, p, err := g.Migration(r.PathValue("id"))
		if err != nil {
			code := http.StatusInternalServerError
			if errors.Is(err, migrate.ErrNotFound) {
				code = http.StatusNotFound
			}
			http.Error(w, err.Error(), code)
			return
		}
		reply(w, MigrationStatus{Record: rec, Progress: p}, nil)
	})
	mux.HandleFunc("POST /v1/images/{name}/verify", func(w http.ResponseWriter, r *http.Request) {
		rep, err := g.VerifyImage(r.Context(), r.PathValue("name"))
		reply(w, rep, err)
	})
	mux.HandleFunc("POST /v1/images/{name}/remove", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Reason string `json:"reason"`
		}
		if err := decodeRequest(r.Body, 64<<10).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		img, err := g.RemoveImage(r.PathValue("name"), req.Reason)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnprocessableEntity)
			return
		}
		img.Manifest.Chunks = nil
		reply(w, img, nil)
	})
	// Requests end with the socket: a rotation or burst under way must
	// not go on working on a gateway that has stopped.
	base, stop := context.WithCancel(context.Background())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, BaseContext: func(net.Listener) context.Context { return base }}
	go srv.Serve(ln)
	return closerFunc(func() error {
		stop()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		err := srv.Shutdown(ctx)
		os.Remove(path)
		return err
	}), nil
}

// GraphFormats are the renderings of the mesh graph.
var GraphFormats = []string{"dot", "svg", "json"}

// serveGraph answers GET …/graph?format=dot|svg|json, on the control
// socket and on the operator endpoint.
func (g *Gateway) serveGraph(w http.ResponseWriter, r *http.Request) {
	format := r.URL.Query().Get("format")
	if format == "" {
		format = "dot"
	}
	if !slices.Contains(GraphFormats, format) {
		http.Error(w, fmt.Sprintf("format %q: want one of %s", format, strings.Join(GraphFormats, ", ")), http.StatusBadRequest)
		return
	}
	mg, err := g.Graph()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	switch format {
	case "dot":
		w.Header().Set("Content-Type", "text/vnd.graphviz; charset=utf-8")
		io.WriteString(w, mg.DOT())
	case "svg":
		w.Header().Set("Content-Type", "image/svg+xml")
		io.WriteString(w, mg.SVG())
	default:
		reply(w, mg, nil)
	}
}

// decodeRequest reads a request of the CLI, up to limit bytes, refusing
// a field this gateway does not know: asked of a gateway of an earlier
// release than the CLI's, a setting it would drop (a pace, a format) is
// an error saying so, not ignored.
func decodeRequest(body io.Reader, limit int64) *json.Decoder {
	d := json.NewDecoder(io.LimitReader(body, limit))
	d.DisallowUnknownFields()
	return d
}

// MigrationStatus is a migration's record and, while it runs, its progress.
type MigrationStatus struct {
	Record   *migrate.SendRecord `json:"record"`
	Progress *migrate.Progress   `json:"progress,omitempty"`
}

// MigrationEvent is one line of the NDJSON stream a migration request
// answers with: progress snapshots, then the final record (and error).
type MigrationEvent struct {
	ID       string               `json:"id"`
	Progress *migrate.Progress    `json:"progress,omitempty"`
	Record   *migrate.SendRecord  `json:"record,omitempty"`
	Error    string               `json:"error,omitempty"`
	Denied   *migrate.DeniedError `json:"denied,omitempty"`
}

// streamMigration starts a migration and streams its progress until it
// ends. The migration belongs to the gateway: if the client goes away, it
// carries on (skybridge migrate status/cancel reach it by ID).
func (g *Gateway) streamMigration(w http.ResponseWriter, r *http.Request, req MigrationRequest) {
	run, id, err := g.StartMigration(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusUnprocessableEntity)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	fl, _ := w.(http.Flusher)
	send := func(ev MigrationEvent) {
		enc.Encode(ev)
		if fl != nil {
			fl.Flush()
		}
	}
	sub := run.subscribe()
	for {
		select {
		case <-r.Context().Done():
			// A stop cancels the sends and waits for them before it
			// closes the socket, which ends this request too: the end,
			// there already, is still the client's.
			select {
			case <-run.done:
				send(finalEvent(id, run))
			default:
			}
			return
		case p, ok := <-sub:
			if !ok {
				<-run.done
				send(finalEvent(id, run))
				return
			}
			send(MigrationEvent{ID: id, Progress: &p})
		}
	}
}

// finalEvent is how a migration ended, once run.done is closed.
func finalEvent(id string, run *runningMigration) MigrationEvent {
	ev := MigrationEvent{ID: id, Record: run.rec}
	if run.err != nil {
		ev.Error = run.err.Error()
		var d *migrate.DeniedError
		if errors.As(run.err, &d) {
			ev.Denied = d
		}
	}
	return ev
}

func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// controlDir checks the way to the control socket's directory (see
// trustedWay) and returns the directory as the links lead to it.
//
// owner is the user besides root whose directories are trusted: the
// gateway's own, or, for a client, the user who serves the socket. strict
// (the client's) also refuses a directory its group or, sticky, others
// may write: there another user could have made the way, and the socket.
func controlDir(dir string, owner int, strict bool, log *slog.Logger) (string, error) {
	return trustedWay(dir, owner, strict, log, controlWords)
}

// fileKind names what a file is, for errors.
func fileKind(m os.FileMode) string {
	switch m.Type() {
	case 0:
		return "regular file"
	case os.ModeDir:
		return "directory"
	case os.ModeSymlink:
		return "symbolic link"
	case os.ModeSocket:
		return "socket"
	case os.ModeNamedPipe:
		return "named pipe"
	case os.ModeDevice, os.ModeDevice | os.ModeCharDevice:
		return "device"
	}
	return "file of mode " + m.Type().String()
}

// Client talks to a gateway's control socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the control socket at path.
func NewClient(path string) *Client {
	return &Client{socket: path, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", path)
			if err != nil {
				return nil, err
			}
			if err := checkServer(c, path); err != nil {
				c.Close()
				return nil, err
			}
			return c, nil
		},
	}}}
}

// checkServer refuses a control socket that another user serves: put
// where the gateway's socket should be (a directory they could write, a
// gateway down), it would be sent what the CLI sends, policies and Vault
// tokens for bursts. The gateway runs as root or as the operator's user.
func checkServer(c net.Conn, path string) error {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("control socket %s: %w", path, err)
	}
	var cred *unix.Ucred
	cerr := raw.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if err = cmp.Or(cerr, err); err != nil {
		return fmt.Errorf("control socket %s: who serves it: %w", path, err)
	}
	if me := os.Geteuid(); int(cred.Uid) == me || cred.Uid == 0 {
		return nil
	}
	// A gateway run as a service user, reached with sudo: its socket is
	// its own, on a way to it only root and that user may change, as the
	// gateway checked when it made it. Another user's socket where the
	// gateway's should be could only be on a way that user may change.
	if err := servedOnItsOwnWay(path, int(cred.Uid)); err != nil {
		return &serverUserError{Socket: path, Uid: int(cred.Uid), Pid: int(cred.Pid), Why: err.Error()}
	}
	return nil
}

// servedOnItsOwnWay checks that the socket at path is uid's and that
// every directory and link on the way to it is root's or uid's.
func servedOnItsOwnWay(path string, uid int) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	dir, err := controlDir(filepath.Dir(abs), uid, true, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	fi, err := os.Lstat(filepath.Join(dir, filepath.Base(abs)))
	if err != nil {
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != uid || fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("%s is not a socket of user %d's", path, uid)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm()&0o002 != 0 {
		return fmt.Errorf("its directory %s may be written by any user", dir)
	}
	return nil
}

// serverUserError is the client's refusal of a control socket served by
// a user other than its own or root, on a way to it others may change.
type serverUserError struct {
	Socket string
	Uid    int
	Pid    int
	Why    string // why its way is not that user's own
}

func (e *serverUserError) Error() string {
	return fmt.Sprintf("control socket %s is served by user %d (process %d), neither yours (%d) nor root, and %s: nothing was sent to it. If that is the gateway's user, run the command as that user (sudo -u '#%d' …); if not, someone else put a socket there: check control { socket = … } and who may write its directory", e.Socket, e.Uid, e.Pid, os.Geteuid(), e.Why, e.Uid)
}

func (c *Client) do(ctx context.Context, method, path string, body any, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytesReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://gateway"+path, rd)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if se, ok := errors.AsType[*serverUserError](err); ok {
		return se
	}
	if err != nil {
		var ne *net.OpError
		if errors.As(err, &ne) {
			return fmt.Errorf("cannot reach the gateway at %s (is `skybridge gateway run` up, and are you its user?): %w", c.socket, err)
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return &GatewayError{Code: resp.StatusCode, Msg: string(trimNL(msg))}
	}
	if s, ok := out.(*string); ok {
		b, err := io.ReadAll(resp.Body)
		*s = string(b)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Operator fetches where the operator endpoint listens and the
// dashboard link with its token.
func (c *Client) Operator(ctx context.Context) (*OperatorLink, error) {
	var l OperatorLink
	return &l, c.do(ctx, http.MethodGet, "/v1/operator", nil, &l)
}

// Plan asks the gateway for a placement plan.
func (c *Client) Plan(ctx context.Context, req PlanRequest) (*migrate.Plan, error) {
	var p migrate.Plan
	return &p, c.do(ctx, http.MethodPost, "/v1/plan", req, &p)
}

// BurstUp opens a burst site on a CA-holding gateway.
func (c *Client) BurstUp(ctx context.Context, req BurstRequest) (*BurstGrant, error) {
	var g BurstGrant
	return &g, c.do(ctx, http.MethodPost, "/v1/bursts", req, &g)
}

// BurstDown ends a burst site now; vaultToken is needed for a Vault
// burst (an operator's token that may revoke and delete roles).
func (c *Client) BurstDown(ctx context.Context, site, vaultToken string) (*BurstInfo, error) {
	var bi BurstInfo
	body := map[string]string{"vault_token": vaultToken}
	return &bi, c.do(ctx, http.MethodPost, "/v1/bursts/"+url.PathEscape(site)+"/down", body, &bi)
}

// Bursts lists the burst sites the gateway opened.
func (c *Client) Bursts(ctx context.Context) ([]BurstInfo, error) {
	var l []BurstInfo
	return l, c.do(ctx, http.MethodGet, "/v1/bursts", nil, &l)
}

// Status fetches the gateway's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	return &st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Graph fetches the mesh graph in a format of GraphFormats.
func (c *Client) Graph(ctx context.Context, format string) (string, error) {
	var s string
	return s, c.do(ctx, http.MethodGet, "/v1/graph?format="+url.QueryEscape(format), nil, &s)
}

// PublishPolicy hands a signed policy to the gateway, which verifies it,
// adopts it if it is newer and spreads it through the mesh.
func (c *Client) PublishPolicy(ctx context.Context, src, sig []byte) (adopted bool, revision string, err error) {
	var out struct {
		Adopted bool   `json:"adopted"`
		Policy  string `json:"policy"`
	}
	err = c.do(ctx, http.MethodPost, "/v1/policy", map[string][]byte{"Policy": src, "Signature": sig}, &out)
	return out.Adopted, out.Policy, err
}

// Migrate starts (or, with req.ID and no image, resumes) a migration and
// calls onEvent for every progress event until it ends.
func (c *Client) Migrate(ctx context.Context, req MigrationRequest, onEvent func(MigrationEvent)) (*MigrationEvent, error) {
	path := "/v1/migrations"
	var body any = req
	if req.ID != "" && req.Image == "" {
		path, body = "/v1/migrations/"+url.PathEscape(req.ID)+"/resume", MigrationRequest{Streams: req.Streams, BWLimit: req.BWLimit}
	}
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://gateway"+path, bytesReader(b))
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(hr)
	if se, ok := errors.AsType[*serverUserError](err); ok {
		return nil, se
	}
	if err != nil {
		return nil, fmt.Errorf("cannot reach the gateway at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, &RefusedError{Msg: string(trimNL(msg))}
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev MigrationEvent
		if err := dec.Decode(&ev); err != nil {
			return nil, fmt.Errorf("the migration's progress stream ended early: %w", err)
		}
		if ev.Record != nil || ev.Error != "" {
			return &ev, nil
		}
		onEvent(ev)
	}
}

// RefusedError is the gateway's answer refusing a request (no such
// migration, a bad image name): it was heard, unlike a stream that broke.
type RefusedError struct{ Msg string }

func (e *RefusedError) Error() string { return "gateway: " + e.Msg }

// Migrations lists migrations and stored images.
func (c *Client) Migrations(ctx context.Context) (*MigrationList, error) {
	var l MigrationList
	return &l, c.do(ctx, http.MethodGet, "/v1/migrations", nil, &l)
}

// Migration returns one migration's record and progress.
func (c *Client) Migration(ctx context.Context, id string) (*MigrationStatus, error) {
	var s MigrationStatus
	err := c.do(ctx, http.MethodGet, "/v1/migrations/"+url.PathEscape(id), nil, &s)
	if ge, ok := errors.AsType[*GatewayError](err); ok && ge.Code == http.StatusNotFound {
		return nil, fmt.Errorf("%w: %w", ErrNoSuchMigration, err)
	}
	return &s, err
}

// ErrNoSuchMigration is Client.Migration's error for an ID the gateway has
// no record of (never, or it ended over migrate.SendsKept ago).
var ErrNoSuchMigration = errors.New("no such migration")

// GatewayError is a gateway's answer other than success.
type GatewayError struct {
	Code int    // the HTTP status
	Msg  string // the gateway's words
}

func (e *GatewayError) Error() string { return "gateway: " + e.Msg }

// CancelMigration stops a running migration.
func (c *Client) CancelMigration(ctx context.Context, id string) error {
	var out map[string]string
	return c.do(ctx, http.MethodPost, "/v1/migrations/"+url.PathEscape(id)+"/cancel", nil, &out)
}

// VerifyImage re-proves a stored image.
func (c *Client) VerifyImage(ctx context.Context, name string) (*migrate.VerifyReport, error) {
	var r migrate.VerifyReport
	return &r, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/verify", nil, &r)
}

// RemoveImage deletes a stored image; the reason goes into its audit
// record.
func (c *Client) RemoveImage(ctx context.Context, name, reason string) (*migrate.ImageRecord, error) {
	var r migrate.ImageRecord
	return &r, c.do(ctx, http.MethodPost, "/v1/images/"+url.PathEscape(name)+"/remove", map[string]string{"reason": reason}, &r)
}

// RotateWireGuardKey asks the gateway to replace its WireGuard key.
func (c *Client) RotateWireGuardKey(ctx context.Context) (*WGRotationReport, error) {
	var r WGRotationReport
	return &r, c.do(ctx, http.MethodPost, "/v1/keys/rotate-wg", nil, &r)
}

// RotateGossipKey rotates the mesh's gossip key from this gateway; force
// rotates without the gateways that are away (see Gateway.RotateGossipKey).
func (c *Client) RotateGossipKey(ctx context.Context, force bool) (*RotationReport, error) {
	var r RotationReport
	path := "/v1/keys/rotate-gossip"
	if force {
		path += "?force=1"
	}
	return &r, c.do(ctx, http.MethodPost, path, nil, &r)
}
