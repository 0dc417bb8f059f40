package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// The control endpoint is HTTP over a unix socket that only the gateway's
// user can open (0600 in a 0700 directory): file permissions are its
// authentication, as for the Docker and containerd sockets.

func (g *Gateway) serveControl() (io.Closer, error) {
	path := g.s.ControlSocket
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use: is another gateway running with this state directory?", path)
	}
	os.Remove(path)
	old := umask(0o177)
	ln, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := g.Status()
		reply(w, st, err)
	})
	mux.HandleFunc("GET /v1/graph", func(w http.ResponseWriter, r *http.Request) {
		dot, err := g.Graph()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/vnd.graphviz")
		io.WriteString(w, dot)
	})
	mux.HandleFunc("POST /v1/policy", func(w http.ResponseWriter, r *http.Request) {
		var req struct{ Policy, Signature []byte }
		if err := json.NewDecoder(io.LimitReader(r.Body, 4<<20)).Decode(&req); err != nil {
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
	mux.HandleFunc("POST /v1/keys/rotate-gossip", func(w http.ResponseWriter, r *http.Request) {
		rep, err := g.RotateGossipKey(r.Context())
		reply(w, rep, err)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	return closerFunc(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		err := srv.Shutdown(ctx)
		os.Remove(path)
		return err
	}), nil
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
		return fmt.Errorf("gateway: %s", string(trimNL(msg)))
	}
	if s, ok := out.(*string); ok {
		b, err := io.ReadAll(resp.Body)
		*s = string(b)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Status fetches the gateway's status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	return &st, c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Graph fetches the mesh graph in Graphviz dot.
func (c *Client) Graph(ctx context.Context) (string, error) {
	var s string
	return s, c.do(ctx, http.MethodGet, "/v1/graph", nil, &s)
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

// RotateGossipKey rotates the mesh's gossip key from this gateway.
func (c *Client) RotateGossipKey(ctx context.Context) (*RotationReport, error) {
	var r RotationReport
	return &r, c.do(ctx, http.MethodPost, "/v1/keys/rotate-gossip", nil, &r)
}
