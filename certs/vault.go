package certs

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"

	"github.com/skybridge-mesh/skybridge/internal/jitter"
)

// Vault is the production identity back end: gateway certificates from a
// PKI secrets engine role (pki/sign with a CSR made on the gateway, so its
// key never leaves it), the CA and revocation list from the same engine,
// and the WireGuard key and gossip keyring in KV v2.
//
// The PKI role must let the gateway ask for its attributes, e.g.
//
//	vault write pki/roles/skybridge-gateway \
//	    allow_any_name=true enforce_hostnames=false allow_ip_sans=true \
//	    allowed_uri_sans='skybridge://onprem-zrh/*?provider=onprem&region=zrh-dc1&jurisdiction=CH*' \
//	    key_type=ec key_bits=256 server_flag=true client_flag=true \
//	    max_ttl=72h not_before_duration=30s
//
// A role per site (allowed_uri_sans naming the site and its place: the
// canonical attribute URI puts them first) and an AppRole per site bound
// to it is what keeps a compromised gateway of one site from obtaining a
// certificate for another, or for its own site in another jurisdiction.
type Vault struct {
	client     *vault.Client
	cfg        *VaultConfig
	meshPrefix netip.Prefix
	log        *slog.Logger
	stop       context.CancelFunc
	wg         sync.WaitGroup

	// loginMu serialises logins. fresh hands a login made for a refused
	// request to maintainLogin, which then renews that one.
	loginMu sync.Mutex
	fresh   chan *vault.Secret

	// awaiting is set from a start while Vault was unreachable until the
	// first login succeeds: requests fail at once with errVaultAwaited
	// rather than each waiting out the client's retries and timeout.
	awaiting atomic.Bool
	// refused is what Vault answered the background login of such a
	// start, if it answered with a refusal: requests fail with it from
	// then on instead of errVaultAwaited, so that nothing more is served
	// from the copies on disk once Vault has said no.
	refused atomic.Pointer[error]

	// issuerReadDenied is when the policy was found not to allow reading
	// pki/issuer/<id> (Unix ns; 0: allowed or not known), asked again an
	// hour later. keyUnknown says once that issuers' keys cannot be told.
	issuerReadDenied atomic.Int64
	keyUnknown       sync.Once

	// anonTrust is set while Trust reads without a login (Vault refuses
	// it), so that the change is said once each way.
	anonTrust atomic.Bool
	// held, if set (Provider sets it), reads the trust bundle this
	// gateway holds: Trust says at every refresh that Vault's lists are
	// numbered below it, and takes from an answer read without a login
	// only the CAs it holds (onlyHeldCAs).
	held func() (*TrustBundle, error)
}

// errVaultAwaited is what a request gets from a gateway that started
// while Vault was unreachable and has not logged in since.
var errVaultAwaited = errors.New("vault was unreachable when this gateway started and it has not logged in since (it keeps trying)")

// startLoginTimeout bounds the login of a gateway that may start without
// Vault: a Vault that drops packets would otherwise hold the start for the
// client's three attempts of a minute each. loginTimeout bounds every
// later login for the same reason: one stuck on a Vault that has gone
// silent would hold loginMu, and the next attempt, for minutes after
// Vault came back.
const (
	startLoginTimeout = 20 * time.Second
	loginTimeout      = 30 * time.Second
)

// ErrVaultLoginRefused: Vault answered an AppRole login, and refused it
// as an unknown role or SecretID (a burst gateway's, once its burst was
// taken down). Other refusals (a 403 from a proxy in front of Vault, a
// role Vault could not look up) are not this.
var ErrVaultLoginRefused = errors.New("vault refused the login: unknown role or SecretID")

// VaultUnreachable reports whether err means that Vault could not be
// asked — no connection, a reset or a timeout, a name that does not
// resolve, a sealed, standby or overloaded server (HTTP 5xx, 429) —
// rather than that something answered. Only an unreachable Vault is
// ridden out on what a gateway keeps on disk: a refusal (a SecretID or
// policy removed, a token revoked) is the operator's word and stands,
// and so does a TLS handshake that fails (a certificate that does not
// verify, a client certificate refused, plain HTTP on the port): that
// may not be Vault at all, or be Vault saying no.
func VaultUnreachable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, errVaultAwaited) {
		return true
	}
	var re *vault.ResponseError
	if errors.As(err, &re) {
		return re.StatusCode >= 500 || re.StatusCode == http.StatusTooManyRequests
	}
	var (
		unknownCA x509.UnknownAuthorityError
		badName   x509.HostnameError
		invalid   x509.CertificateInvalidError
		verify    *tls.CertificateVerificationError
		record    tls.RecordHeaderError
		op        *net.OpError
		dns       *net.DNSError
		ne        net.Error
	)
	switch {
	case errors.As(err, &unknownCA), errors.As(err, &badName), errors.As(err, &invalid), errors.As(err, &verify), errors.As(err, &record):
		return false
	case errors.As(err, &op) && op.Op == "remote error": // a TLS alert from the server
		return false
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout(), errors.As(err, &dns):
		return true
	case errors.As(err, &op):
		return true // dial, read or write: refused, reset, unreachable
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return true // the connection closed under the request
	case strings.Contains(err.Error(), "http: server closed idle connection"):
		// The same, as net/http words it when the close came before
		// any answer (its error value is not exported).
		return true
	}
	return false
}

var (
	_ Issuer      = (*Vault)(nil)
	_ SecretStore = (*Vault)(nil)
)

// vaultClientConfig is the Vault client's configuration: the address
// given (or VAULT_ADDR), over https unless on loopback, and the server's
// certificate always verified. Tokens, SecretIDs, WireGuard keys and the
// gossip keyring cross this connection, and a join token carries the
// address to newcomers across the internet: VAULT_SKIP_VERIFY, which the
// Vault client would otherwise honour, is not.
func vaultClientConfig(addr string, tlsc *vault.TLSConfig) (*vault.Config, error) {
	vc := vault.DefaultConfig()
	if vc.Error != nil {
		return nil, fmt.Errorf("vault client configuration: %w", vc.Error)
	}
	if addr != "" {
		vc.Address = addr
	}
	// The address checked is the one dialled, and the one join tokens
	// hand out: VAULT_AGENT_ADDR, which the client would dial instead,
	// and VAULT_SRV_LOOKUP, which changes the host, are not taken.
	vc.AgentAddress, vc.SRVLookup = "", false
	if err := checkVaultAddress(vc.Address); err != nil {
		return nil, err
	}
	if err := vc.ConfigureTLS(tlsc); err != nil {
		return nil, fmt.Errorf("vault TLS: %w", err)
	}
	// ConfigureTLS only ever turns verification off.
	if tr, ok := vc.HttpClient.Transport.(*http.Transport); ok && tr.TLSClientConfig != nil {
		tr.TLSClientConfig.InsecureSkipVerify = false
	}
	// Plain http is allowed because it stays on this host. A proxy
	// (VAULT_PROXY_ADDR, VAULT_HTTP_PROXY: the client sends even loopback
	// through them) and a redirect (a standby Vault names its active
	// node, and the client sends the request again, token and body) would
	// carry it to another, in the clear.
	if u, err := url.Parse(vc.Address); err == nil && u.Scheme == "http" {
		tr, ok := vc.HttpClient.Transport.(*http.Transport)
		if !ok {
			return nil, fmt.Errorf("vault address %s: plain http needs the client's own transport, to send nothing through a proxy", vc.Address)
		}
		tr.Proxy = nil
		vc.DisableRedirects = true
	}
	return vc, nil
}

// checkVaultAddress refuses a Vault address that would carry secrets in
// the clear.
func checkVaultAddress(addr string) error {
	u, err := url.Parse(addr)
	if err != nil || u.Host == "" {
		return fmt.Errorf("vault address %q: want https://HOST:PORT", addr)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip, err := netip.ParseAddr(u.Hostname()); err == nil && ip.IsLoopback() || u.Hostname() == "localhost" {
			return nil
		}
	}
	return fmt.Errorf("vault address %s: tokens, SecretIDs and keys would cross the network in the clear; use https (plain http only on loopback)", addr)
}

// OpenVault logs in to Vault and keeps the login alive (token renewal with
// the api's LifetimeWatcher, re-login when the token reaches its maximum
// TTL) until Close.
func OpenVault(ctx context.Context, cfg *VaultConfig, meshPrefix netip.Prefix, log *slog.Logger) (*Vault, error) {
	return openVault(ctx, cfg, meshPrefix, log, false)
}

// openVault is OpenVault; with rideOut, a Vault that cannot be reached
// (VaultUnreachable) does not fail it: the Vault returned answers every
// request with an error VaultUnreachable recognises until a login in the
// background succeeds.
func openVault(ctx context.Context, cfg *VaultConfig, meshPrefix netip.Prefix, log *slog.Logger, rideOut bool) (*Vault, error) {
	if !meshPrefix.IsValid() {
		return nil, errors.New("vault back end needs mesh_cidr in the identity block: Vault's CA does not carry the overlay range")
	}
	vc, err := vaultClientConfig(cfg.Address, &vault.TLSConfig{CACert: cfg.CACert})
	if err != nil {
		return nil, err
	}
	client, err := vault.NewClient(vc)
	if err != nil {
		return nil, fmt.Errorf("vault client: %w", err)
	}
	if cfg.Namespace != "" {
		client.SetNamespace(cfg.Namespace)
	} else if ns := client.Namespace(); ns != "" {
		// VAULT_NAMESPACE, which the api client applies by itself: taken
		// into the settings, so that what the gateway records and hands
		// out (join tokens, a burst's place, removal commands) names the
		// namespace it really uses, not the root.
		c := *cfg
		c.Namespace = ns
		cfg = &c
		log.Info("vault namespace taken from VAULT_NAMESPACE", "namespace", ns)
	}
	v := &Vault{client: client, cfg: cfg, meshPrefix: meshPrefix, log: log.With("vault", vc.Address), fresh: make(chan *vault.Secret, 1)}
	lctx := ctx
	if rideOut {
		var cancel context.CancelFunc
		lctx, cancel = context.WithTimeout(ctx, startLoginTimeout)
		defer cancel()
	}
	secret, err := v.login(lctx)
	switch {
	case err == nil:
		if err := v.checkKVMount(ctx); err != nil {
			return nil, err
		}
	case rideOut && ctx.Err() == nil && VaultUnreachable(err):
		v.log.Warn("vault unreachable: starting on the identity and secrets kept on disk, logging in once it answers", "err", err)
		v.awaiting.Store(true)
		// Not VAULT_TOKEN, which NewClient took from the environment:
		// until it logs in, the gateway holds no token of its own, and
		// RevokeLogin must not revoke someone else's.
		v.client.ClearToken()
		secret = nil
	default:
		return nil, err
	}
	bg, stop := context.WithCancel(context.Background())
	v.stop = stop
	v.wg.Go(func() { v.maintainLogin(bg, secret) })
	return v, nil
}

// checkKVMount refuses a KV mount of version 1: every call skybridge makes
// to it would fail on paths that version does not have ("data/",
// "metadata/"), with errors that do not say why. Where Vault will not say
// what the mount is (no rights to ask, an older Vault), the first call to
// it says what is wrong instead.
func (v *Vault) checkKVMount(ctx context.Context) error {
	s, err := v.client.Logical().ReadWithContext(ctx, path.Join("sys/internal/ui/mounts", v.cfg.KVMount))
	if err != nil || s == nil {
		return nil
	}
	typ, _ := s.Data["type"].(string)
	opts, _ := s.Data["options"].(map[string]any)
	version, _ := opts["version"].(string)
	if (typ == "kv" || typ == "generic") && version != "2" {
		return fmt.Errorf("vault kv_mount %q is a KV version 1 mount; skybridge keeps its secrets in KV version 2: upgrade it (`vault kv enable-versioning %s`) or name a version 2 mount", v.cfg.KVMount, v.cfg.KVMount)
	}
	return nil
}

// Close stops token renewal.
func (v *Vault) Close() {
	v.stop()
	v.wg.Wait()
}

// loginRefused reports whether an AppRole login's error is Vault's own
// answer that the role or SecretID is unknown (HTTP 400, in Vault's words).
func loginRefused(err error) bool {
	var re *vault.ResponseError
	if !errors.As(err, &re) || re.StatusCode != http.StatusBadRequest {
		return false
	}
	for _, e := range re.Errors {
		switch e = strings.ToLower(e); {
		case strings.Contains(e, "invalid role or secret id"), strings.Contains(e, "invalid secret id"), strings.Contains(e, "invalid role id"):
			return true
		}
	}
	return false
}

// RevokeLogin revokes the gateway's own token; the Vault is not to be used
// after it (Close first). A burst gateway does so when its burst ends:
// Vault keeps a deleted AppRole's tokens until their TTL (BurstTokenTTL at
// most), and one copied off a rented server should be worth nothing before
// then.
func (v *Vault) RevokeLogin(ctx context.Context) error {
	if v.awaiting.Load() {
		return nil // never logged in: no token of ours
	}
	return v.client.Auth().Token().RevokeSelfWithContext(ctx, "")
}

// login authenticates and returns the login secret (its Auth part says
// whether and how long the token can be renewed). It logs in on a copy of
// the client and gives the client the new token only once it has one:
// requests sent meanwhile keep the old token (refused as invalid, they
// log in again), and a failed login leaves it in place rather than none
// (refused without a word about the token, they would not).
func (v *Vault) login(ctx context.Context) (*vault.Secret, error) {
	c, err := v.client.CloneWithHeaders() // the namespace is a header
	if err != nil {
		return nil, fmt.Errorf("vault client: %w", err)
	}
	s, err := v.loginWith(ctx, c)
	if err != nil {
		return nil, err
	}
	v.client.SetToken(s.Auth.ClientToken)
	return s, nil
}

func (v *Vault) loginWith(ctx context.Context, c *vault.Client) (*vault.Secret, error) {
	a := &v.cfg.Auth
	switch a.Method {
	case "token":
		tok := os.Getenv("VAULT_TOKEN")
		if a.TokenFile != "" {
			b, err := ReadPrivateFile(a.TokenFile)
			if err != nil {
				return nil, fmt.Errorf("vault token: %w", err)
			}
			tok = strings.TrimSpace(string(b))
		}
		if tok == "" {
			return nil, errors.New("vault token auth: set token_file or VAULT_TOKEN")
		}
		c.SetToken(tok)
		self, err := c.Auth().Token().LookupSelfWithContext(ctx)
		if err != nil {
			return nil, fmt.Errorf("vault token auth: %w", err)
		}
		ttl, _ := self.TokenTTL()
		renewable, _ := self.TokenIsRenewable()
		// Rounded up: a token with less than a second left is expiring,
		// not one without a TTL (a root token's is 0), which is never
		// read again.
		lease := int((ttl + time.Second - 1) / time.Second)
		return &vault.Secret{Auth: &vault.SecretAuth{ClientToken: tok, Renewable: renewable, LeaseDuration: lease}}, nil
	case "approle":
		roleID := a.RoleID
		if a.RoleIDFile != "" {
			b, err := os.ReadFile(a.RoleIDFile)
			if err != nil {
				return nil, fmt.Errorf("vault approle role_id_file: %w", err)
			}
			roleID = strings.TrimSpace(string(b))
		}
		var opts []approle.LoginOption
		if a.Mount != "" {
			opts = append(opts, approle.WithMountPath(a.Mount))
		}
		if a.Wrapped {
			opts = append(opts, approle.WithWrappingToken())
		}
		sid := &approle.SecretID{FromEnv: a.SecretIDEnv}
		if a.SecretIDFile != "" {
			// Read here, not by the AppRole library, which takes a file
			// anyone may read.
			b, err := ReadPrivateFile(a.SecretIDFile)
			if err != nil {
				return nil, fmt.Errorf("vault approle secret_id_file: %w", err)
			}
			if len(bytes.TrimSpace(b)) == 0 {
				return nil, fmt.Errorf("vault approle secret_id_file %s is empty", a.SecretIDFile)
			}
			sid = &approle.SecretID{FromString: strings.TrimSpace(string(b))}
		}
		auth, err := approle.NewAppRoleAuth(roleID, sid, opts...)
		if err != nil {
			return nil, fmt.Errorf("vault approle: %w", err)
		}
		c.ClearToken() // NewClient, and so the copy, took VAULT_TOKEN from the environment
		s, err := c.Auth().Login(ctx, auth)
		if loginRefused(err) {
			return nil, fmt.Errorf("vault approle login: %w: %w", ErrVaultLoginRefused, err)
		}
		if err != nil {
			return nil, fmt.Errorf("vault approle login: %w", err)
		}
		if s == nil || s.Auth == nil {
			return nil, errors.New("vault approle login returned no token")
		}
		return s, nil
	}
	return nil, fmt.Errorf("vault auth method %q is not supported", a.Method)
}

// relogin logs in again, one login at a time, unless the client's token
// is no longer stale: another login replaced it since it was found
// wanting, and that one is used (nil secret). A login made for a refused
// request is handed to maintainLogin before loginMu is let go, so that
// maintainLogin, finding its token replaced, finds the login in fresh.
func (v *Vault) relogin(ctx context.Context, stale string, handOver bool) (*vault.Secret, error) {
	v.loginMu.Lock()
	defer v.loginMu.Unlock()
	if v.client.Token() != stale {
		return nil, nil
	}
	lctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	s, err := v.login(lctx)
	if err == nil && handOver {
		select { // the newest login replaces one maintainLogin has not taken
		case <-v.fresh:
		default:
		}
		v.fresh <- s
	}
	return s, err
}

// withLogin runs a request with the gateway's token and, if Vault refuses
// the token as invalid, logs in again at once and runs it once more. The
// watcher that renews the token can be late — a host that was suspended,
// a Vault or a host under load — and a certificate must not expire
// waiting for it. A request refused for want of a permission fails
// again, and its error is returned.
func (v *Vault) withLogin(ctx context.Context, req func() error) error {
	if v.awaiting.Load() {
		if r := v.refused.Load(); r != nil {
			return fmt.Errorf("vault refuses this gateway's login: %w", *r)
		}
		return errVaultAwaited
	}
	stale := v.client.Token()
	err := req()
	if !isInvalidToken(err) && !(isForbidden(err) && v.tokenRefused(ctx, stale)) {
		return err
	}
	s, lerr := v.relogin(ctx, stale, true)
	if lerr != nil {
		// Both in the chain: the request's refusal first (what is
		// checked of it stays the same), and ErrVaultLoginRefused for
		// those who wait longer on a login Vault refuses.
		return fmt.Errorf("%w (and logging in again: %w)", err, lerr)
	}
	if s != nil {
		v.log.Info("vault refused the token: logged in again")
	}
	return req()
}

// isInvalidToken reports whether Vault refused a request's token itself
// (expired, revoked), as opposed to its permissions. Only Vault 1.17 and
// later say so in the error (hashicorp/vault#25953); before, both are a
// bare "permission denied", which tokenRefused tells apart.
func isInvalidToken(err error) bool {
	var re *vault.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusForbidden &&
		strings.Contains(strings.Join(re.Errors, " "), "invalid token")
}

func isForbidden(err error) bool {
	var re *vault.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusForbidden
}

// tokenRefused reports whether Vault refuses token itself: a token may
// always look itself up (the default policy), so a lookup refused too
// means the token is dead, not short of a permission.
func (v *Vault) tokenRefused(ctx context.Context, token string) bool {
	c, err := v.client.CloneWithHeaders()
	if err != nil {
		return false
	}
	c.SetToken(token)
	_, err = c.Auth().Token().LookupSelfWithContext(ctx)
	return isForbidden(err)
}

// maintainLogin renews the token while Vault allows and logs in again when
// it does not (maximum TTL reached, token revoked). A nil secret (a start
// while Vault was unreachable) begins with a login.
func (v *Vault) maintainLogin(ctx context.Context, secret *vault.Secret) {
	for {
		stale := "" // without a login yet, the client holds no token
		if secret != nil {
			if s := v.waitForLoginEnd(ctx, secret); s != nil {
				secret = s // a refused request logged in again: renew that login
				continue
			}
			if ctx.Err() != nil {
				return
			}
			stale = secret.Auth.ClientToken
		}
		s, err := v.relogin(ctx, stale, false)
		for backoff := time.Second; err != nil; backoff = min(2*backoff, time.Minute) {
			if ctx.Err() != nil {
				return // closed while logging in
			}
			if refusal := err; secret == nil && ctx.Err() == nil && !VaultUnreachable(refusal) && v.refused.Swap(&refusal) == nil {
				v.log.Error("vault answers but refuses this gateway's login: it stops using the secrets kept on disk (it keeps its certificate until it ends)", "err", err)
			}
			wait := jitter.Spread(backoff)
			v.log.Error("vault login failed", "err", err, "retry_in", wait.Round(time.Millisecond))
			select {
			case <-ctx.Done():
				return
			case s = <-v.fresh: // a refused request logged in meanwhile
				err = nil
			case <-time.After(wait):
				s, err = v.relogin(ctx, stale, false)
			}
		}
		if s == nil {
			// A refused request logged in first, and handed its
			// login over before letting go of loginMu.
			select {
			case <-ctx.Done():
				return
			case s = <-v.fresh:
			}
		} else if secret != nil {
			v.log.Info("vault login renewed by logging in again")
		}
		if secret == nil {
			v.loggedInLate(ctx)
		}
		secret = s
	}
}

// loggedInLate ends a start without Vault: requests go to Vault again, and
// what OpenVault would have refused at once is reported now.
func (v *Vault) loggedInLate(ctx context.Context) {
	v.refused.Store(nil)
	v.awaiting.Store(false)
	v.log.Info("vault answers again: logged in")
	if err := v.checkKVMount(ctx); err != nil {
		v.log.Error("vault kv_mount refused", "err", err)
	}
}

// waitForLoginEnd returns when the login in secret can no longer be used
// (or ctx ends), or with a newer login that withLogin made meanwhile.
func (v *Vault) waitForLoginEnd(ctx context.Context, secret *vault.Secret) *vault.Secret {
	auth := secret.Auth
	switch {
	case auth.Renewable:
		w, err := v.client.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: secret})
		if err != nil {
			v.log.Error("vault token watcher", "err", err)
			return nil
		}
		go w.Start()
		defer w.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case s := <-v.fresh:
				return s
			case err := <-w.DoneCh():
				if err != nil {
					v.log.Warn("vault token renewal ended", "err", err)
				}
				return nil
			case r := <-w.RenewCh():
				v.log.Debug("vault token renewed", "ttl_s", r.Secret.Auth.LeaseDuration)
			}
		}
	case auth.LeaseDuration > 0:
		// Not renewable but expiring: log in again shortly before.
		select {
		case <-ctx.Done():
		case s := <-v.fresh:
			return s
		case <-time.After(time.Duration(auth.LeaseDuration) * time.Second * 9 / 10):
		}
		return nil
	default:
		select { // a token without TTL (root) never needs renewal
		case <-ctx.Done():
		case s := <-v.fresh:
			return s
		}
		return nil
	}
}

// Sign implements Issuer with pki/sign/<role>.
func (v *Vault) Sign(ctx context.Context, csrPEM []byte, attrs Attributes, ttl time.Duration) (*x509.Certificate, error) {
	attrs.Normalize()
	if err := attrs.Validate(v.meshPrefix); err != nil {
		return nil, err
	}
	uri := attrs.URI()
	if v.cfg.PinOverlayIP {
		uri = attrs.PinnedURI()
	}
	req := map[string]any{
		"csr":                  string(csrPEM),
		"common_name":          attrs.Node,
		"uri_sans":             uri.String(),
		"ip_sans":              attrs.OverlayIP.String(),
		"format":               "pem",
		"exclude_cn_from_sans": true,
	}
	if ttl > 0 { // else the role decides: a burst role's not_after refuses any ttl
		req["ttl"] = ttl.String()
	}
	var s *vault.Secret
	err := v.withLogin(ctx, func() (err error) {
		s, err = v.client.Logical().WriteWithContext(ctx, path.Join(v.cfg.PKIMount, "sign", v.cfg.PKIRole), req)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("vault %s/sign/%s: %w", v.cfg.PKIMount, v.cfg.PKIRole, err)
	}
	var certPEM string
	if s != nil { // an empty answer (a proxy in the way) is no certificate, not a crash
		certPEM, _ = s.Data["certificate"].(string)
	}
	certs, err := ParseCertificatesPEM([]byte(certPEM))
	if err != nil {
		return nil, fmt.Errorf("vault returned no certificate: %w", err)
	}
	cert := certs[0]
	got, err := AttributesOf(cert)
	if err != nil {
		return nil, fmt.Errorf("vault role %s issued a certificate skybridge cannot use (check its allowed_uri_sans and exclude_cn_from_sans): %w", v.cfg.PKIRole, err)
	}
	if !got.Equal(&attrs) {
		return nil, fmt.Errorf("vault role %s changed the requested attributes: asked %+v, got %+v", v.cfg.PKIRole, attrs, *got)
	}
	return cert, nil
}

// Trust implements Issuer: every issuer of the PKI mount that can sign
// (has a key there) and is not revoked, each with its CRL, and which of
// them is the default, the one that signs new certificates. While an
// issuer is rotated (root/rotate, then the new one made default) both are
// trusted, so certificates of the old one keep working until they are
// renewed; once the old issuer is deleted or revoked, the mesh no longer
// trusts it. An issuer imported without its key (a bank's offline root
// above the mount's intermediate) signs nothing for the mesh, and trusting
// it would admit whatever else it certified. Vault serves all of this to
// anyone: no policy is needed for it, nor a login — while Vault refuses
// the gateway's (its SecretID expired or destroyed, its token past its
// maximum TTL) Trust reads without a token, and the mesh goes on learning
// the revocations made in Vault.
func (v *Vault) Trust(ctx context.Context) (*TrustBundle, error) {
	// What the gateway holds, read before Vault is asked: a list gossip
	// brings meanwhile is not Vault's behind it.
	var held *TrustBundle
	if v.held != nil {
		held, _ = v.held()
	}
	var anon *vault.Client
	if v.awaiting.Load() && v.refused.Load() != nil {
		// A start without Vault, whose login Vault has refused since.
		// (Before Vault answered at all, Trust fails at once like every
		// request: the start must not wait out the client's retries.)
		anon = v.anonClient()
	}
	tb, err := v.trust(ctx, anon)
	if err != nil && anon == nil && isForbidden(err) && !v.tokenAlive(ctx) {
		// Vault refused the token, and a new login too (withLogin
		// tried): the same reads without one.
		first := err
		anon = v.anonClient()
		if tb, err = v.trust(ctx, anon); err == nil {
			tb, err = onlyHeldCAs(tb, held, v.meshPrefix)
		}
		if err != nil {
			return nil, fmt.Errorf("%w; and read without a login: %v", first, err)
		}
	} else if err == nil && anon != nil {
		tb, err = onlyHeldCAs(tb, held, v.meshPrefix)
	}
	if err != nil {
		return nil, err
	}
	if was := v.anonTrust.Swap(anon != nil); anon != nil && !was {
		v.log.Warn("vault refuses this gateway's login: its CAs and revocation lists are read without it, as Vault serves them to anyone (an issuer revoked in Vault is not told then); give the gateway a login again")
	} else if anon == nil && was {
		v.log.Info("vault takes this gateway's login again: its CAs and revocation lists are read with it")
	}
	v.sayListsBehind(held, tb)
	return tb, nil
}

// onlyHeldCAs keeps, of an answer tb read without a login, the CAs this
// gateway trusts already (held) and their lists: without a login Vault does not
// say which issuers it revoked, and one revoked there, still listed with
// its key, must not come back. (With nothing held, nothing is taken.)
func onlyHeldCAs(tb, held *TrustBundle, meshPrefix netip.Prefix) (*TrustBundle, error) {
	if held == nil {
		return nil, errors.New("without a login Vault does not say which of its issuers are revoked: only CAs the gateway trusts already are taken from it, and it holds none (no trust bundle saved)")
	}
	var cas []*x509.Certificate
	for _, c := range tb.CAs() {
		if held.index(c) >= 0 {
			cas = append(cas, c)
		}
	}
	if len(cas) == 0 {
		return nil, errors.New("without a login Vault does not say which of its issuers are revoked, and none of them is a CA the gateway trusts already")
	}
	out, err := NewTrustBundle(cas, meshPrefix)
	if err != nil {
		return nil, err
	}
	for _, crl := range tb.CRLs() {
		if out.SignedByCA(crl) {
			if out, err = out.WithCRL(crl); err != nil {
				return nil, err
			}
		}
	}
	if sg := tb.Signing(); sg != nil && out.index(sg) >= 0 {
		return out.WithSigning(sg)
	}
	return out, nil
}

// anonClient is a copy of the client without a token, for what Vault
// serves to anyone; its TLS is the client's, verified as ever.
func (v *Vault) anonClient() *vault.Client {
	c, err := v.client.CloneWithHeaders() // the namespace is a header
	if err != nil {
		return v.client // not made from a client that was
	}
	c.ClearToken()
	return c
}

// sayListsBehind logs, at every answer, each CA whose list in Vault is
// numbered below the one this gateway holds, and what to do about it.
func (v *Vault) sayListsBehind(held, tb *TrustBundle) {
	if held == nil {
		return // nothing held yet: nothing to be behind
	}
	const most = 20 // serials named in the log
	for _, b := range held.listsBehind(tb) {
		missing := make([]string, 0, min(len(b.missingAtIssuer), most))
		for _, s := range b.missingAtIssuer[:min(len(b.missingAtIssuer), most)] {
			missing = append(missing, FormatSerial(s))
		}
		v.log.Error("Vault's revocation list of the mesh CA is numbered below (or as) the mesh's, and differs (Vault restored from a snapshot, or the CA imported into another mount or cluster): this gateway enforces both, but gossip spreads only the mesh's, so gateways that do not read Vault miss what is revoked there, and once Vault's number passes the mesh's its list replaces the mesh's. "+
			"Revoke again in Vault the certificates of missing_in_vault that are still valid, then run `vault read "+path.Join(v.cfg.PKIMount, "crl/rotate")+"` until vault_number passes mesh_number (this is said at every refresh until then)",
			"ca", b.ca.Subject.CommonName, "vault_number", b.issued.Number, "mesh_number", b.held.Number,
			"revoked_in_vault_only", len(b.onlyAtIssuer), "missing_in_vault", missing, "missing_count", len(b.missingAtIssuer))
	}
}

// trust is Trust, read with the gateway's login, or without any with
// anon (a client without a token).
func (v *Vault) trust(ctx context.Context, anon *vault.Client) (*TrustBundle, error) {
	ids, def, err := v.issuers(ctx, anon)
	if err != nil {
		return nil, err
	}
	if ids == nil {
		return v.defaultIssuerTrust(ctx, anon)
	}
	var (
		cas     []*x509.Certificate
		signing *x509.Certificate
		crls    []*x509.RevocationList
	)
	for _, is := range ids {
		d, err := v.issuerDetail(ctx, anon, is)
		if err != nil {
			return nil, err
		}
		switch {
		case d.revoked, d.keyKnown && !d.keyed:
			continue
		case !d.keyKnown && is.id != def:
			// Vault 1.11–1.13 without read on issuer/+: whether it has
			// a key is not known, and only the default surely does.
			v.keyUnknown.Do(func() {
				v.log.Warn("this Vault does not say which issuers have a key (before 1.14) and this gateway's policy does not let it read them: only the default issuer is trusted, so an issuer rotation drops the old CA at once; grant read on "+path.Join(v.cfg.PKIMount, "issuer/+"), "issuer", is.id)
			})
			continue
		}
		crlPEM, err := v.readField(ctx, anon, path.Join(v.cfg.PKIMount, "issuer", is.id, "crl"), "crl")
		if err != nil {
			return nil, err
		}
		crl, err := ParseCRL(crlPEM)
		if err != nil {
			return nil, fmt.Errorf("vault issuer %s CRL: %w", is.id, err)
		}
		cas, crls = append(cas, d.cert), append(crls, crl)
		if is.id == def {
			signing = d.cert
		}
	}
	if len(cas) == 0 && def == "" {
		// Neither keys nor the default told: the default, as before
		// several issuers per mount.
		return v.defaultIssuerTrust(ctx, anon)
	}
	if len(cas) == 0 {
		return nil, fmt.Errorf("vault %s has no issuer with a key that is not revoked: generate or import the mesh's issuing CA there (pki/root/generate/internal, or pki/intermediate/set-signed with its key)", v.cfg.PKIMount)
	}
	tb, err := NewTrustBundle(cas, v.meshPrefix)
	if err != nil {
		return nil, err
	}
	for _, crl := range crls {
		if tb, err = tb.WithCRL(crl); err != nil {
			return nil, fmt.Errorf("vault CRL: %w", err)
		}
	}
	if signing == nil && def == "" {
		// A list without is_default: the default issuer's certificate.
		caPEM, err := v.readPEM(ctx, anon, path.Join(v.cfg.PKIMount, "cert", "ca"))
		if err != nil {
			return nil, err
		}
		if dc, err := ParseCertificatesPEM(caPEM); err == nil && len(dc) > 0 && tb.index(dc[0]) >= 0 {
			signing = dc[0]
		}
	}
	if signing != nil {
		return tb.WithSigning(signing)
	}
	return tb, nil
}

// listedIssuer is an issuer as LIST pki/issuers names it; keyID is nil
// where the list does not say (before Vault 1.14).
type listedIssuer struct {
	id    string
	keyID *string
}

// issuers lists the PKI mount's issuers, in a stable order (so the
// bundle's key moves only when Vault's answer does), and the default
// one's ID if the list says. Nil (and no error) from a Vault without
// several issuers per mount (before 1.11).
func (v *Vault) issuers(ctx context.Context, anon *vault.Client) (ids []listedIssuer, def string, err error) {
	p := path.Join(v.cfg.PKIMount, "issuers")
	var s *vault.Secret
	err = v.ask(ctx, anon, func(c *vault.Client) (err error) {
		s, err = c.Logical().ListWithContext(ctx, p)
		return err
	})
	if err != nil {
		var re *vault.ResponseError
		if errors.As(err, &re) && (re.StatusCode == http.StatusNotFound || re.StatusCode == http.StatusMethodNotAllowed) {
			return nil, "", nil
		}
		return nil, "", fmt.Errorf("vault list %s: %w", p, err)
	}
	if s == nil {
		return nil, "", nil
	}
	info, _ := s.Data["key_info"].(map[string]any)
	for id, raw := range info {
		is := listedIssuer{id: id}
		if m, _ := raw.(map[string]any); m != nil {
			if d, _ := m["is_default"].(bool); d {
				def = id
			}
			if k, ok := m["key_id"].(string); ok {
				is.keyID = &k
			}
		}
		ids = append(ids, is)
	}
	if len(ids) == 0 {
		return nil, "", fmt.Errorf("vault %s has no issuer: generate or import the mesh's issuing CA there (pki/root/generate/internal)", v.cfg.PKIMount)
	}
	slices.SortFunc(ids, func(a, b listedIssuer) int { return strings.Compare(a.id, b.id) })
	return ids, def, nil
}

// issuerDetail is what Trust needs of an issuer.
type issuerDetail struct {
	cert            *x509.Certificate
	keyKnown, keyed bool // whether it is known that it has a key; whether it has
	revoked         bool
}

// issuerDetail reads an issuer: pki/issuer/<id> says whether it has a key
// and is revoked, but needs read on it; without (or without a login:
// anon), pki/issuer/<id>/json (served to anyone) and the list's key_id,
// and a revoked issuer is not told apart (said once, when for want of
// the policy).
func (v *Vault) issuerDetail(ctx context.Context, anon *vault.Client, is listedIssuer) (issuerDetail, error) {
	p := path.Join(v.cfg.PKIMount, "issuer", is.id)
	var d issuerDetail
	data, err := map[string]any(nil), errIssuerReadDenied
	if at := v.issuerReadDenied.Load(); anon == nil && (at == 0 || time.Since(time.Unix(0, at)) > issuerReadRetry) {
		data, err = v.read(ctx, nil, p)
		if isForbidden(err) && !v.tokenAlive(ctx) {
			// Vault refused the token, not the path (an expired one
			// that could not be replaced): not a policy to note. Trust
			// reads again without it.
			return d, err
		}
	}
	switch {
	case err == nil:
		k, _ := data["key_id"].(string)
		d.keyKnown, d.keyed = true, k != ""
		d.revoked, _ = data["revoked"].(bool)
		v.issuerReadDenied.Store(0)
	case errors.Is(err, errIssuerReadDenied) || isForbidden(err):
		if !errors.Is(err, errIssuerReadDenied) && v.issuerReadDenied.Swap(time.Now().UnixNano()) == 0 {
			v.log.Warn("this gateway's Vault policy does not let it read the PKI mount's issuers: one revoked in Vault stays trusted until it is deleted; grant read on "+path.Join(v.cfg.PKIMount, "issuer/+"), "err", err)
		}
		if data, err = v.read(ctx, anon, path.Join(p, "json")); err != nil {
			return d, err
		}
		if is.keyID != nil {
			d.keyKnown, d.keyed = true, *is.keyID != ""
		}
	default:
		return d, err
	}
	pemStr, _ := data["certificate"].(string)
	cas, err := ParseCertificatesPEM([]byte(pemStr))
	if err != nil || len(cas) != 1 {
		return d, fmt.Errorf("vault issuer %s: want one CA certificate (%v)", is.id, err)
	}
	d.cert = cas[0]
	return d, nil
}

// errIssuerReadDenied stands for a read of pki/issuer/<id> this
// gateway's policy was found not to allow: tried again after
// issuerReadRetry (the policy may have been mended).
var errIssuerReadDenied = errors.New("read on the PKI mount's issuers denied")

const issuerReadRetry = time.Hour

// tokenAlive reports whether Vault takes the client's token: a token may
// always look itself up (the default policy).
func (v *Vault) tokenAlive(ctx context.Context) bool {
	_, err := v.client.Auth().Token().LookupSelfWithContext(ctx)
	return err == nil
}

// ask runs a request with the gateway's login (withLogin), or with anon
// if not nil: a client without a token, for what Vault serves to anyone.
func (v *Vault) ask(ctx context.Context, anon *vault.Client, req func(*vault.Client) error) error {
	if anon != nil {
		return req(anon)
	}
	return v.withLogin(ctx, func() error { return req(v.client) })
}

// read reads p's data, with the gateway's login or with anon (ask).
func (v *Vault) read(ctx context.Context, anon *vault.Client, p string) (map[string]any, error) {
	var s *vault.Secret
	err := v.ask(ctx, anon, func(c *vault.Client) (err error) {
		s, err = c.Logical().ReadWithContext(ctx, p)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("vault read %s: %w", p, err)
	}
	if s == nil {
		return nil, fmt.Errorf("vault read %s: nothing there (is the PKI engine mounted at %q and its CA configured?)", p, v.cfg.PKIMount)
	}
	return s.Data, nil
}

// defaultIssuerTrust is the trust of a Vault with one issuer per mount.
func (v *Vault) defaultIssuerTrust(ctx context.Context, anon *vault.Client) (*TrustBundle, error) {
	caPEM, err := v.readPEM(ctx, anon, path.Join(v.cfg.PKIMount, "cert", "ca"))
	if err != nil {
		return nil, err
	}
	cas, err := ParseCertificatesPEM(caPEM)
	if err != nil {
		return nil, fmt.Errorf("vault CA certificate: %w", err)
	}
	tb, err := NewTrustBundle(cas, v.meshPrefix)
	if err != nil {
		return nil, err
	}
	crlPEM, err := v.readPEM(ctx, anon, path.Join(v.cfg.PKIMount, "cert", "crl"))
	if err != nil {
		return nil, err
	}
	crl, err := ParseCRL(crlPEM)
	if err != nil {
		return nil, fmt.Errorf("vault CRL: %w", err)
	}
	return tb.WithCRL(crl)
}

func (v *Vault) readPEM(ctx context.Context, anon *vault.Client, p string) ([]byte, error) {
	return v.readField(ctx, anon, p, "certificate")
}

// readField reads a PEM text field at p.
func (v *Vault) readField(ctx context.Context, anon *vault.Client, p, field string) ([]byte, error) {
	data, err := v.read(ctx, anon, p)
	if err != nil {
		return nil, err
	}
	pemStr, _ := data[field].(string)
	if pemStr == "" {
		return nil, fmt.Errorf("vault read %s: no %s field", p, field)
	}
	return []byte(pemStr), nil
}

// Revoke implements Issuer with pki/revoke.
func (v *Vault) Revoke(ctx context.Context, serial *big.Int) error {
	err := v.withLogin(ctx, func() error {
		_, err := v.client.Logical().WriteWithContext(ctx, path.Join(v.cfg.PKIMount, "revoke"), map[string]any{"serial_number": FormatSerial(serial)})
		return err
	})
	if err != nil {
		return fmt.Errorf("vault revoke %s: %w", FormatSerial(serial), err)
	}
	return nil
}

func (v *Vault) kv() *vault.KVv2 { return v.client.KVv2(v.cfg.KVMount) }

func (v *Vault) wgPath(node string) string { return wgKeyPath(v.cfg.KVPrefix, node) }

func wgKeyPath(kvPrefix, node string) string { return path.Join(kvPrefix, "nodes", node, "wireguard") }

func (v *Vault) gossipPath() string { return path.Join(v.cfg.KVPrefix, "gossip") }

// WireGuardKey implements SecretStore: KV v2 at <prefix>/nodes/<node>/wireguard,
// created with check-and-set 0 so two starts of one gateway cannot store
// two different keys.
func (v *Vault) WireGuardKey(ctx context.Context, node string) (k WGPrivateKey, err error) {
	err = v.withLogin(ctx, func() (err error) {
		k, err = v.wireGuardKey(ctx, node)
		return err
	})
	return k, err
}

func (v *Vault) wireGuardKey(ctx context.Context, node string) (WGPrivateKey, error) {
	for range 3 {
		s, err := v.kv().Get(ctx, v.wgPath(node))
		if err == nil {
			if s == nil || s.Data == nil {
				return WGPrivateKey{}, v.deletedVersion(v.wgPath(node), s)
			}
			str, _ := s.Data["private_key"].(string)
			k, err := ParseWGPrivateKey(str)
			if err != nil {
				return WGPrivateKey{}, fmt.Errorf("vault %s/%s: %w", v.cfg.KVMount, v.wgPath(node), err)
			}
			return k, nil
		}
		if !errors.Is(err, vault.ErrSecretNotFound) {
			return WGPrivateKey{}, fmt.Errorf("vault read WireGuard key: %w", err)
		}
		k, err := GenerateWGKey()
		if err != nil {
			return WGPrivateKey{}, err
		}
		_, err = v.kv().Put(ctx, v.wgPath(node), map[string]any{"private_key": k.Base64Secret()}, vault.WithCheckAndSet(0))
		if err == nil {
			return k, nil
		}
		if !isCASMismatch(err) {
			return WGPrivateKey{}, fmt.Errorf("vault store WireGuard key: %w", err)
		}
	}
	return WGPrivateKey{}, errors.New("vault WireGuard key keeps changing under us")
}

// kvVersion is the version of a KV v2 read or write, 0 where Vault (or a
// proxy in the way) did not say.
func kvVersion(s *vault.KVSecret) int {
	if s == nil || s.VersionMetadata == nil {
		return 0
	}
	return s.VersionMetadata.Version
}

// deletedVersion says that the latest version of the KV secret at p is
// deleted (Vault answers a read of it with no data), and how to bring it
// back: read as a secret of nothing, it made a key "not 32 bytes" and a
// keyring "empty", which pointed nowhere.
func (v *Vault) deletedVersion(p string, s *vault.KVSecret) error {
	ns := ""
	if v.cfg.Namespace != "" {
		ns = "VAULT_NAMESPACE=" + v.cfg.Namespace + " "
	}
	if s != nil && s.VersionMetadata != nil && s.VersionMetadata.Destroyed {
		return fmt.Errorf("vault %s/%s: its latest version, %d, is destroyed and cannot come back: `%svault kv metadata delete -mount=%s %s` removes the secret, and the gateway then puts back the gossip keyring it kept, or makes a new WireGuard key",
			v.cfg.KVMount, p, s.VersionMetadata.Version, ns, v.cfg.KVMount, p)
	}
	version := "its latest version"
	undelete := fmt.Sprintf("%svault kv undelete -mount=%s -versions=N %s", ns, v.cfg.KVMount, p)
	if s != nil && s.VersionMetadata != nil {
		version = fmt.Sprintf("its latest version, %d,", s.VersionMetadata.Version)
		undelete = fmt.Sprintf("%svault kv undelete -mount=%s -versions=%d %s", ns, v.cfg.KVMount, s.VersionMetadata.Version, p)
	}
	return fmt.Errorf("vault %s/%s: %s is deleted: `%s` brings it back (a mount with delete_version_after deletes versions by itself: unset it for skybridge's secrets)", v.cfg.KVMount, p, version, undelete)
}

// SetWireGuardKey implements SecretStore: a new version of the KV secret
// (the old versions stay in Vault's history, as KV v2 keeps them), written
// with check-and-set on the version read just before — which a mount
// hardened with cas_required demands, and which keeps two writers from
// replacing each other's key unseen.
func (v *Vault) SetWireGuardKey(ctx context.Context, node string, k WGPrivateKey) error {
	if err := v.withLogin(ctx, func() error {
		version := 0
		cur, err := v.kv().Get(ctx, v.wgPath(node))
		switch {
		case errors.Is(err, vault.ErrSecretNotFound):
		case err != nil:
			return err
		case cur.VersionMetadata != nil:
			version = cur.VersionMetadata.Version
		}
		_, err = v.kv().Put(ctx, v.wgPath(node), map[string]any{"private_key": k.Base64Secret()}, vault.WithCheckAndSet(version))
		return err
	}); err != nil {
		return fmt.Errorf("vault store WireGuard key: %w", err)
	}
	return nil
}

// DeleteWireGuardKey destroys every version of node's WireGuard key: a
// burst gateway does so when its burst ends.
func (v *Vault) DeleteWireGuardKey(ctx context.Context, node string) error {
	if err := v.withLogin(ctx, func() error { return v.kv().DeleteMetadata(ctx, v.wgPath(node)) }); err != nil {
		return fmt.Errorf("vault delete WireGuard key: %w", err)
	}
	return nil
}

// GossipKeyring implements SecretStore: KV v2 at <prefix>/gossip. The first
// gateway to start creates it (check-and-set 0); everyone else reads it.
func (v *Vault) GossipKeyring(ctx context.Context) (kr *GossipKeyring, err error) {
	return v.gossipKeyring(ctx, nil)
}

// gossipKeyring is GossipKeyring; kept, if not nil, is the mesh's keyring
// as this gateway kept it, which goes back into Vault if Vault holds
// none: a keyring deleted there, a Vault restored from an older backup,
// must not become a new one that cuts this gateway off from the mesh's
// gossip (and the gateways started after it).
func (v *Vault) gossipKeyring(ctx context.Context, kept *GossipKeyring) (kr *GossipKeyring, err error) {
	err = v.withLogin(ctx, func() (err error) {
		kr, _, err = v.readKeyring(ctx, true, kept)
		return err
	})
	return kr, err
}

func (v *Vault) readKeyring(ctx context.Context, create bool, kept *GossipKeyring) (*GossipKeyring, int, error) {
	for range 3 {
		s, err := v.kv().Get(ctx, v.gossipPath())
		if err == nil {
			if s == nil || s.Data == nil {
				return nil, 0, v.deletedVersion(v.gossipPath(), s)
			}
			str, _ := s.Data["keyring"].(string)
			kr, err := ParseGossipKeyring([]byte(str))
			if err != nil {
				return nil, 0, fmt.Errorf("vault %s/%s: %w", v.cfg.KVMount, v.gossipPath(), err)
			}
			return kr, kvVersion(s), nil
		}
		if !errors.Is(err, vault.ErrSecretNotFound) || !create {
			return nil, 0, fmt.Errorf("vault read gossip keyring: %w", err)
		}
		kr := kept
		if kr == nil {
			if kr, err = GenerateGossipKeyring(); err != nil {
				return nil, 0, err
			}
		}
		s, err = v.kv().Put(ctx, v.gossipPath(), map[string]any{"keyring": string(kr.MarshalSecret())}, vault.WithCheckAndSet(0))
		if err == nil {
			if kept != nil {
				v.log.Warn("vault held no gossip keyring: put back the one this gateway kept (was it deleted, or Vault restored from an older backup?)", "path", v.gossipPath())
			} else {
				v.log.Info("created the mesh gossip keyring in vault", "path", v.gossipPath())
			}
			return kr, kvVersion(s), nil
		}
		if !isCASMismatch(err) {
			return nil, 0, fmt.Errorf("vault store gossip keyring: %w", err)
		}
	}
	return nil, 0, errors.New("vault gossip keyring keeps changing under us")
}

// UpdateGossipKeyring implements SecretStore with a check-and-set loop.
func (v *Vault) UpdateGossipKeyring(ctx context.Context, update func(*GossipKeyring) (*GossipKeyring, error)) error {
	return v.withLogin(ctx, func() error { return v.updateGossipKeyring(ctx, update) })
}

func (v *Vault) updateGossipKeyring(ctx context.Context, update func(*GossipKeyring) (*GossipKeyring, error)) error {
	for range 5 {
		cur, version, err := v.readKeyring(ctx, false, nil)
		if err != nil {
			return err
		}
		next, err := update(cur)
		if err != nil {
			return err
		}
		if next.Same(cur) {
			// Already so: every gateway of the mesh applies a rotation
			// step to the one keyring its initiator has already written,
			// and a burst gateway may only read it.
			return nil
		}
		_, err = v.kv().Put(ctx, v.gossipPath(), map[string]any{"keyring": string(next.MarshalSecret())}, vault.WithCheckAndSet(version))
		if err == nil {
			return nil
		}
		if !isCASMismatch(err) {
			return fmt.Errorf("vault store gossip keyring: %w", err)
		}
	}
	return errors.New("vault gossip keyring: too many concurrent updates, try again")
}

func isCASMismatch(err error) bool {
	var re *vault.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusBadRequest &&
		strings.Contains(strings.Join(re.Errors, " "), "check-and-set")
}
