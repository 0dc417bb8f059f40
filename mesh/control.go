package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/skybridge-mesh/skybridge/migrate"
)

// The control endpoint is HTTP over a unix socket that only the gateway's
// user can open (0600, in a directory of that user or root that not every
// user may write): file permissions are its authentication, as for the
// Docker and containerd sockets.

func (g *Gateway) serveControl() (io.Closer, error) {
	path := g.s.ControlSocket
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	// In a directory another user may write, or owns, that user could put
	// a socket of theirs at the path while the gateway is down, and be
	// sent what the CLI sends: policies, Vault tokens for bursts. A group
	// may write it under umask 002, where each user has a group of their
	// own: that is only said.
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() && st.Uid != 0 {
		return nil, fmt.Errorf("control socket directory %s belongs to user %d, neither this gateway's nor root: that user could take the socket's place; set control { socket = \"…\" } in a directory of the gateway's own", dir, st.Uid)
	}
	if fi.Mode().Perm()&0o002 != 0 {
		return nil, fmt.Errorf("control socket directory %s may be written by any user (mode %v): one could take the socket's place; run chmod o-w on it, or set control { socket = \"…\" } in a directory of the gateway's own", dir, fi.Mode().Perm())
	}
	if fi.Mode().Perm()&0o020 != 0 {
		g.log.Warn("control socket directory may be written by its group: members could take the socket's place", "dir", dir, "mode", fi.Mode().Perm().String())
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use: is another gateway running with this state directory?", path)
	}
	os.Remove(path)
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
			return
		case p, ok := <-sub:
			if !ok {
				<-run.done
				ev := MigrationEvent{ID: id, Record: run.rec}
				if run.err != nil {
					ev.Error = run.err.Error()
					var d *migrate.DeniedError
					if errors.As(run.err, &d) {
						ev.Denied = d
					}
				}
				send(ev)
				return
			}
			send(MigrationEvent{ID: id, Progress: &p})
		}
	}
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
			return d.DialContext(ctx, "unix", path)
		},
	}}}
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
