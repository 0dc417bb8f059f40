package mesh

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/certs"
	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
	"github.com/skybridge-mesh/skybridge/internal/jitter"
)

// The newcomer's side of a burst site: `skybridge gateway run
// --join-token` on a fresh cloud server. The gateway makes its key, has it
// certified by an enrolling gateway (whose certificate it checks against
// the CA its token pins), stores the identity, and from then on is an
// ordinary gateway whose node block came from its certificate, until the
// burst ends: then it leaves and forgets its identity.

// fileEnrollment, in the identity directory, records that the identity
// there came from a burst enrollment. It is written last: its presence
// means the identity beside it is complete.
const fileEnrollment = "burst.json"

// Enrollment is a burst gateway's record of how it joined.
type Enrollment struct {
	Site     string     `json:"site"`
	Node     string     `json:"node"`
	TokenID  string     `json:"token_id"`
	Enrolled time.Time  `json:"enrolled"`
	Expires  time.Time  `json:"expires"`
	Seeds    []string   `json:"seeds"`
	Ended    *time.Time `json:"ended,omitempty"`
	Reason   string     `json:"end_reason,omitempty"`
	// Vault is set when Vault admitted us: how to log in and what we are.
	Vault *VaultEnrollment `json:"vault,omitempty"`
}

// VaultEnrollment is the identity configuration a Vault join token gave:
// no secret (the SecretID sits beside it in a 0600 file).
type VaultEnrollment struct {
	Address      string           `json:"address"`
	Namespace    string           `json:"namespace,omitempty"`
	AppRoleMount string           `json:"approle_mount"`
	PKIMount     string           `json:"pki_mount"`
	PKIRole      string           `json:"pki_role"`
	KVMount      string           `json:"kv_mount"`
	KVPrefix     string           `json:"kv_prefix"`
	MeshCIDR     string           `json:"mesh_cidr"`
	Node         certs.Attributes `json:"node"`
	PinIP        bool             `json:"pin_ip,omitempty"` // the burst's role pins the overlay IP in the URI
}

// fileVaultCA is the CA of Vault's TLS certificate, as a Vault join token
// gave it (public; the AppRole's files are certs.FileVaultRoleID and
// certs.FileVaultSecretID).
const fileVaultCA = "vault-ca.pem"

func loadEnrollment(dir string) (*Enrollment, error) {
	var e Enrollment
	found, err := atomicfile.ReadJSON(filepath.Join(dir, fileEnrollment), &e)
	if errors.Is(err, atomicfile.ErrDamaged) {
		return nil, fmt.Errorf("%w; this gateway cannot tell which burst it belongs to or whether it has ended: empty %s and enrol it again with a new join token (`skybridge burst up` on an enrolling gateway)", err, dir)
	}
	if !found || err != nil {
		return nil, err
	}
	return &e, nil
}

func saveEnrollment(dir string, e *Enrollment) error {
	return atomicfile.WriteJSON(filepath.Join(dir, fileEnrollment), e, 0o600)
}

// filePendingEnrollment, in the identity directory (0600), holds the key a
// burst gateway asks a certificate for, written before it asks and removed
// once the identity is stored (at the next start, if a crash came
// between). An answer lost — to a crash, to the network — is asked for
// again with the same key and token, which the enrolling gateway answers
// again rather than calling the token used; an identity found half-stored
// beside it is this enrollment's, to be replaced.
const filePendingEnrollment = "burst.pending.json"

// forgetBurstIdentity removes what the ended burst of token holds that
// could rejoin the mesh: its identity and secrets, and the key of an
// enrollment a crash left pending, unless that key is a new token's: its
// answer lost, the enrollment is asked for again with it (with another,
// the enroller calls the token used).
func forgetBurstIdentity(dir, token string) error {
	err := certs.ForgetIdentity(dir)
	if p, perr := loadPending(dir); perr == nil && p != nil && p.TokenID != token {
		return err
	}
	return errors.Join(err, forgetPending(dir))
}

// forgetPending removes the key kept for an enrollment, with the
// temporaries of its writes a crash left: once the identity is stored,
// a copy of its private key that nothing reads.
func forgetPending(dir string) error {
	err := atomicfile.RemoveTemps(dir, 0, filePendingEnrollment)
	if rerr := os.Remove(filepath.Join(dir, filePendingEnrollment)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return err
}

// dropPending is forgetPending for an enrolled gateway, which runs on
// without it: the key left is said, for whoever can remove it.
func dropPending(dir string, log *slog.Logger) {
	if err := forgetPending(dir); err != nil {
		log.Warn("enrolled, but the pending enrollment's key file, a copy of the node's private key, could not be removed: remove it by hand", "file", filepath.Join(dir, filePendingEnrollment), "err", err)
	}
}

type pendingEnrollment struct {
	TokenID string `json:"token_id"`
	Key     []byte `json:"key"` // PKCS #8
}

// loadPending reads the key kept for an enrollment under way — a private
// key, refused like any other when others may read it.
func loadPending(dir string) (*pendingEnrollment, error) {
	path := filepath.Join(dir, filePendingEnrollment)
	b, err := certs.ReadPrivateFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var p pendingEnrollment
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("%s is %w: %w; it is the key of an enrollment that was cut short: remove it, and node.key and node.crt beside it, then start the gateway again with a new join token", path, atomicfile.ErrDamaged, err)
	}
	return &p, nil
}

// pendingKey is the key to ask with for token id: the one kept for it, or
// a new one, kept before anything is asked.
func pendingKey(dir string, p *pendingEnrollment, id string) (*ecdsa.PrivateKey, error) {
	if p != nil && p.TokenID == id {
		k, err := x509.ParsePKCS8PrivateKey(p.Key)
		if key, ok := k.(*ecdsa.PrivateKey); err == nil && ok {
			return key, nil
		}
	}
	key, err := certs.GenerateNodeKey()
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	if err := certs.MkdirPrivate(dir); err != nil {
		return nil, err
	}
	return key, atomicfile.WriteJSON(filepath.Join(dir, filePendingEnrollment), pendingEnrollment{TokenID: id, Key: der}, 0o600)
}

// BurstEndedError is how a burst gateway's run ends: its site expired or
// was taken down, it left the mesh and forgot its identity. It is the
// expected end of a burst, not a failure.
type BurstEndedError struct {
	Site, Node, Reason string
}

func (e *BurstEndedError) Error() string {
	return fmt.Sprintf("burst site %s has ended (%s): gateway %s left the mesh and removed its identity; a new burst needs a new join token",
		e.Site, e.Reason, e.Node)
}

// Join enrols this gateway into a burst site with a join token, unless
// its identity directory already holds a burst identity (a restart: the
// token, used once, is not presented again). The identity is stored in
// the identity directory; New then takes the node's attributes from it.
func Join(ctx context.Context, s *Settings, token string, log *slog.Logger) (*Enrollment, error) {
	if log == nil {
		log = slog.Default()
	}
	dir := s.Identity.Dir
	if s.Identity.Backend != "" && s.Identity.Backend != certs.BackendFile {
		return nil, errors.New("with --join-token the token says where the identity comes from (the mesh CA or Vault): leave the identity block's backend out")
	}
	if n := s.Node; n.Name != "" || n.Site != "" || n.Region != "" || n.Provider != "" || n.Jurisdiction != "" || n.OverlayIP != "" || len(n.Routes) > 0 || len(n.Labels) > 0 {
		return nil, errors.New("with --join-token the burst decides the node's name, site, overlay IP, routes and labels: leave the node block out of the configuration")
	}
	enr, err := loadEnrollment(dir)
	if err != nil {
		return nil, err
	}
	if enr != nil && enr.Ended == nil {
		// A crash between the enrollment record and the removal of the
		// key kept for it left the key: every start comes here, and it
		// stayed for the whole burst.
		dropPending(dir, log)
		log.Info("already enrolled in a burst site: the join token is not used again", "site", enr.Site, "node", enr.Node, "until", enr.Expires)
		return enr, nil
	}
	// A fresh gateway, or one whose burst ended (its identity is gone, or
	// goes now if a crash left it): a new token enrols it anew.
	if enr != nil {
		if err := forgetBurstIdentity(dir, enr.TokenID); err != nil {
			return nil, fmt.Errorf("burst %s ended, but its identity could not be removed: %w", enr.Site, err)
		}
	}
	pending, err := loadPending(dir)
	if err != nil {
		return nil, err
	}
	if certs.HasNodeCertificate(dir) {
		if pending == nil {
			return nil, fmt.Errorf("%s already holds a gateway identity that no join token made: a join token is for a fresh gateway; use another identity directory", dir)
		}
		// Stored in part when the last enrollment was cut short: it
		// is asked for again.
		if err := certs.ForgetIdentity(dir); err != nil {
			return nil, fmt.Errorf("remove the identity an interrupted enrollment left: %w", err)
		}
	}
	tok, err := certs.ParseJoinToken(token)
	if err != nil {
		return nil, err
	}
	// A supervisor restarting the gateway with the token of the burst
	// that ended: that is the expected end, not a failed enrollment.
	if enr != nil && tok.ID == enr.TokenID {
		return nil, &BurstEndedError{Site: enr.Site, Node: enr.Node, Reason: enr.Reason}
	}
	// The enroller judges the token by its own clock; ours may run ahead
	// of it by as much as the mesh allows for.
	if now := time.Now(); tok.Expired(now.Add(-certs.MaxClockSkew)) {
		return nil, fmt.Errorf("join token %s expired at %s (this machine's clock says %s): ask for a new one with `skybridge burst up`",
			tok.ID, tok.Expires.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if tok.Vault != nil {
		return joinVault(ctx, dir, tok, log)
	}
	key, err := pendingKey(dir, pending, tok.ID)
	if err != nil {
		return nil, fmt.Errorf("keep the enrollment's key: %w", err)
	}
	req, err := enrollBody(tok, key)
	if err != nil {
		return nil, err
	}
	log.Info("enrolling", "token", tok)
	res, err := postEnroll(ctx, tok, req, log)
	if err != nil {
		return nil, err
	}
	enr, err = storeEnrollment(dir, s.Identity.MeshCIDR, tok, key, res)
	if err != nil {
		return nil, err
	}
	dropPending(dir, log)
	log.Info("enrolled in burst site", "site", enr.Site, "node", enr.Node, "until", enr.Expires)
	return enr, nil
}

// enrollBody asks for a certificate of key with tok.
func enrollBody(tok *certs.JoinToken, key *ecdsa.PrivateKey) ([]byte, error) {
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "enroll-" + tok.ID}}, key)
	if err != nil {
		return nil, err
	}
	return json.Marshal(enrollRequest{Token: tok.ID, Secret: tok.Secret, CSR: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})})
}

// postEnroll tries each endpoint of the token. A refusal is final; an
// unreachable or failing endpoint is tried again with backoff until the
// token expires (by the enrolling gateway's clock, which ours may lag):
// a server booting in the cloud may run before its network is ready, and
// the enrolling gateway serves 16 connections at once from one address and
// closes the others at once, so of a burst's servers behind one NAT
// address most are turned away until their turn. Retried for a minute
// only, 437 of 2,000 such servers starting at once gave up.
func postEnroll(ctx context.Context, tok *certs.JoinToken, body []byte, log *slog.Logger) (*enrollResponse, error) {
	client := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Chain verification is VerifyPeerCertificate's, against the
		// pinned CA: the enrolling gateway has no name to verify.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return tok.VerifyEnroller(raw, time.Now())
		},
	}}}
	defer client.CloseIdleConnections()
	deadline := tok.Expires.Add(certs.MaxClockSkew)
	backoff := time.Second
	for {
		var errs []error
		for _, ep := range tok.Endpoints {
			r, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+ep.String()+"/v1/enroll", bytes.NewReader(body))
			if err != nil {
				return nil, err
			}
			r.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(r)
			if err != nil {
				if errors.Is(err, certs.ErrEnrollerNotTrusted) {
					return nil, fmt.Errorf("enrollment endpoint %s: %w", ep, err)
				}
				errs = append(errs, fmt.Errorf("%s: %w", ep, err))
				continue
			}
			b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", ep, err))
				continue
			}
			if resp.StatusCode >= 500 {
				errs = append(errs, fmt.Errorf("%s: %s", ep, strings.TrimSpace(string(b))))
				continue
			}
			if resp.StatusCode != http.StatusOK {
				return nil, fmt.Errorf("enrollment refused by %s: %s", ep, strings.TrimSpace(string(b)))
			}
			var res enrollResponse
			if err := json.Unmarshal(b, &res); err != nil {
				return nil, fmt.Errorf("enrollment answer from %s: %w", ep, err)
			}
			return &res, nil
		}
		err := errors.Join(errs...)
		wait := jitter.Spread(backoff)
		if time.Now().Add(wait).After(deadline) {
			return nil, fmt.Errorf("no enrollment endpoint enrolled this server before join token %s expired at %s (check that this server reaches %s over TCP, and the enrolling gateway's log for the errors below, then ask for a new token with `skybridge burst up`): %w",
				tok.ID, tok.Expires.UTC().Format(time.RFC3339), endpointList(tok.Endpoints), err)
		}
		log.Warn("no enrollment endpoint answered (not reachable yet, or turning away more connections from this address than it serves at once), trying again until the join token expires",
			"err", err, "retry_in", wait.Round(time.Millisecond), "until", deadline.UTC().Format(time.RFC3339))
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

func endpointList(eps []netip.AddrPort) string {
	s := make([]string, len(eps))
	for i, ep := range eps {
		s[i] = ep.String()
	}
	return strings.Join(s, ", ")
}

// storeEnrollment checks what the enrolling gateway sent and stores it:
// identity and trust, gossip keyring, and last the enrollment record.
func storeEnrollment(dir, meshCIDR string, tok *certs.JoinToken, key *ecdsa.PrivateKey, res *enrollResponse) (*Enrollment, error) {
	leaf, err := certs.ParseCertificatesPEM(res.Certificate)
	if err != nil || len(leaf) != 1 {
		return nil, fmt.Errorf("enrollment answer: expected one certificate (%v)", err)
	}
	cert := leaf[0]
	cas, err := certs.ParseCertificatesPEM(res.CAs)
	if err != nil {
		return nil, fmt.Errorf("enrollment answer: CA certificates: %w", err)
	}
	// Only the pinned CA is trusted, and CAs it signed (a Vault
	// intermediate): whoever answered could otherwise add a CA of its own
	// to the bundle, and the newcomer would take its certificates,
	// policies and revocation lists.
	var pin *x509.Certificate
	for _, c := range cas {
		if certs.CAPin(c) == tok.CAPin {
			pin = c
		}
	}
	if pin == nil {
		return nil, errors.New("enrollment answer: its CA is not the one the join token pins")
	}
	trusted := []*x509.Certificate{pin}
	for _, c := range cas {
		if c != pin && c.CheckSignatureFrom(pin) == nil {
			trusted = append(trusted, c)
		}
	}
	prefix, _ := netip.ParsePrefix(meshCIDR) // zero when not configured: taken from the CA
	tb, err := certs.NewTrustBundle(trusted, prefix)
	if err != nil {
		return nil, err
	}
	if len(res.CRL) > 0 {
		crl, err := certs.ParseCRL(res.CRL)
		if err != nil {
			return nil, fmt.Errorf("enrollment answer: %w", err)
		}
		if tb, err = tb.WithCRL(crl); err != nil {
			return nil, fmt.Errorf("enrollment answer: %w", err)
		}
	}
	attrs, err := tb.VerifyCertificate(cert, time.Now())
	if err != nil {
		return nil, fmt.Errorf("enrollment answer: the certificate would not be accepted by the mesh: %w", err)
	}
	if attrs.Site != tok.Site {
		return nil, fmt.Errorf("enrollment answer: certificate is for site %s, the token for %s", attrs.Site, tok.Site)
	}
	id, err := certs.NewNodeIdentity(cert, key) // checks that the certificate is for our key
	if err != nil {
		return nil, fmt.Errorf("enrollment answer: %w", err)
	}
	kr, err := certs.ParseGossipKeyring(res.Keyring)
	if err != nil {
		return nil, fmt.Errorf("enrollment answer: gossip keyring: %w", err)
	}
	if err := id.Save(dir, tb); err != nil {
		return nil, err
	}
	if err := certs.SaveGossipKeyring(dir, kr); err != nil {
		return nil, err
	}
	enr := &Enrollment{Site: attrs.Site, Node: attrs.Node, TokenID: tok.ID, Enrolled: time.Now().UTC(), Expires: cert.NotAfter.UTC(), Seeds: res.Seeds}
	if err := saveEnrollment(dir, enr); err != nil {
		return nil, err
	}
	return enr, nil
}

// joinVault redeems a Vault join token: it unwraps the AppRole SecretID
// (which Vault allows once) and stores it with the role ID; the gateway
// then logs in to Vault and obtains its certificate like any Vault-backed
// gateway, with the attributes the token assigned.
func joinVault(ctx context.Context, dir string, tok *certs.JoinToken, log *slog.Logger) (*Enrollment, error) {
	vj := tok.Vault
	log.Info("enrolling through Vault", "token", tok, "vault", vj.Address)
	// Unwrapping spends the token: everything else is written before
	// it, so that what it gives is the one write left to fail.
	if err := certs.MkdirPrivate(dir); err != nil {
		return nil, err
	}
	if vj.CACert != "" {
		if err := atomicfile.WriteFile(filepath.Join(dir, fileVaultCA), []byte(vj.CACert), 0o644); err != nil {
			return nil, err
		}
	}
	roleFile, secretFile := filepath.Join(dir, certs.FileVaultRoleID), filepath.Join(dir, certs.FileVaultSecretID)
	// The SecretID of an enrollment cut short after it was unwrapped
	// (Vault answers the wrapped one once) and stored: this token's, if
	// the role ID beside it is the token's (each burst gateway's AppRole
	// has a role ID of its own). Taken up again, rather than the token
	// being found spent with nothing to show for it.
	role, rerr := os.ReadFile(roleFile)
	held, serr := certs.ReadPrivateFile(secretFile)
	secretID := strings.TrimSpace(string(held))
	if rerr != nil || serr != nil || strings.TrimSpace(string(role)) != vj.RoleID || secretID == "" {
		// Whatever is there is not this token's: gone before the role
		// ID is written, or it would pass for this token's next time.
		if err := os.Remove(secretFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
		if err := atomicfile.WriteFile(roleFile, []byte(vj.RoleID+"\n"), 0o600); err != nil {
			return nil, err
		}
		var err error
		if secretID, err = vj.UnwrapSecretID(ctx); err != nil {
			return nil, err
		}
		if err := atomicfile.WriteFile(secretFile, []byte(secretID+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("%w: the join token is spent; open the burst again for a new one", err)
		}
	} else {
		log.Warn("enrolling through Vault again after an enrollment cut short: its SecretID was kept", "token", tok)
	}
	enr := &Enrollment{Site: tok.Site, Node: vj.Node.Node, TokenID: tok.ID, Enrolled: time.Now().UTC(), Seeds: vj.Seeds,
		Vault: &VaultEnrollment{Address: vj.Address, Namespace: vj.Namespace, AppRoleMount: vj.AppRoleMount, PKIMount: vj.PKIMount,
			PKIRole: vj.PKIRole, KVMount: vj.KVMount, KVPrefix: vj.KVPrefix, MeshCIDR: vj.MeshCIDR, Node: vj.Node, PinIP: vj.PinIP}}
	// The burst ends when the role's not_after does; the token does not
	// say when that is, the certificate will. Until then: the token's
	// own horizon is a lower bound only, so record none.
	if err := saveEnrollment(dir, enr); err != nil {
		return nil, err
	}
	log.Info("enrolled in burst site through Vault", "site", enr.Site, "node", enr.Node)
	return enr, nil
}

// applyEnrollment reads how a burst gateway joined (nil for any other
// gateway) and gives its settings what the enrollment decided: the seeds
// it was handed and, when Vault admitted it, the identity and node
// configuration its token assigned (its configuration file has neither).
// A burst that has ended is an error: the gateway does not start again.
func applyEnrollment(s *Settings) (*Settings, *Enrollment, error) {
	enr, err := loadEnrollment(s.Identity.Dir)
	if err != nil || enr == nil {
		return s, nil, err
	}
	if enr.Ended != nil {
		// Whatever of its identity a crash left behind goes too.
		if err := forgetBurstIdentity(s.Identity.Dir, enr.TokenID); err != nil {
			return s, enr, fmt.Errorf("burst %s ended, but its identity could not be removed: %w", enr.Site, err)
		}
		return s, enr, &BurstEndedError{Site: enr.Site, Node: enr.Node, Reason: enr.Reason}
	}
	// A gateway restarted without its token comes here alone: what
	// Join removes once enrolled goes here too.
	dropPending(s.Identity.Dir, slog.Default())
	c := *s // the caller's settings are left as they were
	c.Seeds = append(slices.Clone(s.Seeds), enr.Seeds...)
	if v := enr.Vault; v != nil {
		dir := s.Identity.Dir
		c.Identity = certs.Config{Backend: certs.BackendVault, Dir: dir, MeshCIDR: v.MeshCIDR, TTL: "role",
			Vault: &certs.VaultConfig{Address: v.Address, Namespace: v.Namespace, PKIMount: v.PKIMount, PKIRole: v.PKIRole,
				KVMount: v.KVMount, KVPrefix: v.KVPrefix, PinOverlayIP: v.PinIP, Auth: certs.VaultAuth{Method: "approle", Mount: v.AppRoleMount,
					RoleIDFile: filepath.Join(dir, certs.FileVaultRoleID), SecretIDFile: filepath.Join(dir, certs.FileVaultSecretID)}}}
		if _, err := os.Stat(filepath.Join(dir, fileVaultCA)); err == nil {
			c.Identity.Vault.CACert = filepath.Join(dir, fileVaultCA)
		}
		c.Node = v.Node.NodeConfig()
	}
	return &c, enr, nil
}

// vaultBurstEnded ends, before anything logs in, the burst of a gateway
// Vault admitted whose certificate kept beside its keys has expired or
// been revoked (by what it last knew) since it last ran: stopped as its
// burst ended, or off across it. Vault would refuse its login, or answer
// with nothing it may use, and it would go on failing with the mesh's
// gossip key and its SecretID on a rented server. One with no certificate
// yet, or none that can be judged, goes on as before.
func (g *Gateway) vaultBurstEnded() error {
	enr := g.burst
	if enr == nil || enr.Vault == nil {
		return nil
	}
	dir := g.s.Identity.Dir
	id, err := certs.LoadNodeIdentity(dir)
	if err != nil {
		return nil
	}
	tb, err := certs.LoadTrustBundle(dir, netip.Prefix{})
	if err != nil {
		return nil
	}
	var ve *certs.VerifyError
	if _, err := tb.VerifyCertificate(id.Certificate(), g.now()); errors.As(err, &ve) && (ve.Reason == certs.ReasonExpired || ve.Reason == certs.ReasonRevoked) {
		ended := &BurstEndedError{Site: enr.Site, Node: enr.Node, Reason: err.Error()}
		g.forgetBurst(ended)
		return ended
	}
	return nil
}

// nodeAttributes are the attributes the gateway runs with: from its node
// block (which applyEnrollment wrote for a gateway Vault admitted), or,
// for a burst gateway the embedded CA enrolled, from the certificate its
// enrollment obtained. One whose certificate has expired or been revoked
// since it last ran forgets it and does not start; any other trouble with
// it is an error that leaves it in place.
func (g *Gateway) nodeAttributes(tb *certs.TrustBundle) (certs.Attributes, error) {
	enr := g.burst
	if enr == nil || enr.Vault != nil {
		return g.s.Node.Attributes(tb.MeshPrefix())
	}
	dir := g.s.Identity.Dir
	id, err := certs.LoadNodeIdentity(dir)
	if err != nil {
		return certs.Attributes{}, fmt.Errorf("burst gateway identity: %w", err)
	}
	if _, err := tb.VerifyCertificate(id.Certificate(), g.now()); err != nil {
		var ve *certs.VerifyError
		if errors.As(err, &ve) && (ve.Reason == certs.ReasonExpired || ve.Reason == certs.ReasonRevoked) {
			ended := &BurstEndedError{Site: enr.Site, Node: enr.Node, Reason: err.Error()}
			g.forgetBurst(ended)
			return certs.Attributes{}, ended
		}
		return certs.Attributes{}, fmt.Errorf("burst gateway identity in %s: %w", dir, err)
	}
	a := *id.Attributes()
	if g.s.Node.Name != "" && g.s.Node.Name != a.Node {
		return a, fmt.Errorf("node block names %s but this burst gateway was enrolled as %s: remove the name", g.s.Node.Name, a.Node)
	}
	return a, nil
}

// burstLeaveEarly is how long before its certificate expires a burst
// gateway leaves, so that its signed leave notice is still valid.
const burstLeaveEarly = 2 * time.Second

// burstClockCheck is how often a burst gateway looks at the wall clock
// for its end: its timer runs on the monotonic clock, which stands still
// while a VM is suspended, and a gateway woken after its burst ended
// would stay on, refused by every peer, for as long as it was suspended.
var burstClockCheck = time.Minute

// watchBurst ends a burst gateway's run when its certificate is about to
// expire or when it sees it revoked (`skybridge burst down`).
func (g *Gateway) watchBurst(ctx context.Context, stop context.CancelCauseFunc) {
	end := g.id.Load().Certificate().NotAfter.Add(-burstLeaveEarly)
	reason := ""
	for reason == "" {
		t := time.NewTimer(min(end.Sub(g.now()), burstClockCheck))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
			if !g.now().Before(end) {
				reason = "its time is up"
			}
		case <-g.revokedSelf:
			t.Stop()
			reason = "taken down: this gateway's certificate was revoked"
		}
	}
	g.log.Info("burst site ended: leaving the mesh", "reason", reason)
	stop(&BurstEndedError{Site: g.burst.Site, Node: g.burst.Node, Reason: reason})
}

// forgetBurst removes what would let this gateway rejoin (its keys and
// certificate) and the membership it remembered, and records the end.
func (g *Gateway) forgetBurst(e *BurstEndedError) {
	log := g.log
	if log == nil {
		log = slog.Default()
	}
	dir := g.s.Identity.Dir
	// The end first: a crash before the identity is gone then leaves an
	// ended burst whose leftovers the next start removes, rather than a
	// live enrollment without an identity, which would not start.
	if enr := g.burst; enr != nil && enr.Ended == nil {
		t := time.Now().UTC()
		enr.Ended, enr.Reason = &t, e.Reason
		if err := saveEnrollment(dir, enr); err != nil {
			// Without the end recorded, a start without the identity
			// would be of a live burst with none (and be restarted for
			// ever, told to run ca issue); with it, the start finds the
			// end again (expiry, revocation) and comes back here.
			enr.Ended, enr.Reason = nil, ""
			log.Error("burst ended, but its end could not be recorded: its identity is kept until a start that can record it", "dir", dir, "err", err)
			return
		}
	}
	var token string
	if g.burst != nil {
		token = g.burst.TokenID
	}
	if err := forgetBurstIdentity(dir, token); err != nil {
		log.Error("burst ended, but its identity could not be removed", "dir", dir, "err", err)
	}
	if err := os.Remove(g.state.path(fileMembers)); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Warn("remove remembered members", "err", err)
	}
}
