package certs

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/skybridge-mesh/skybridge/internal/atomicfile"
)

// Renewal by possession. A gateway whose identity was issued offline
// (`skybridge ca issue`) has no issuer of its own, and its certificate
// would end after 30 days unless someone issued it again by hand. With
// identity.renew_from it renews through a gateway that holds the mesh CA:
// it proves it holds its current certificate's key (mutual TLS) and sends
// a request for a new key; the CA certifies the new key with exactly the
// current certificate's attributes, never with what the request asks.
// Renewal extends what was issued and nothing more: changing attributes
// is still `skybridge ca issue`.

// RenewPath is where a CA-holding gateway's enrollment endpoint renews
// certificates.
const RenewPath = "/v1/renew"

// RenewRequest is what a gateway sends to renew: a request for its new
// key. The attributes come from the certificate it authenticates with.
type RenewRequest struct {
	CSR []byte `json:"csr"` // PEM
}

// RenewResponse is the answer: the new certificate.
type RenewResponse struct {
	Certificate []byte `json:"certificate"` // PEM
}

// Renew certifies the key of csrPEM with the attributes of cert, the
// certificate the requester proved it holds, for as long as cert was
// valid. It refuses (ErrIssueRefused) a certificate this CA did not issue
// or no longer stands behind (expired, revoked, or replaced by a later
// one of the same gateway), a burst gateway's (its certificate lasts
// exactly its burst), one in the first half of its life (a renewal is due
// later: this bounds what a holder can have issued), and a request for
// the same key or for other attributes. The same renewal asked again (its
// answer lost) is answered with the certificate it was issued.
func (ca *CA) Renew(cert *x509.Certificate, csrPEM []byte, now time.Time) (*x509.Certificate, error) {
	if err := cert.CheckSignatureFrom(ca.cert); err != nil {
		return nil, refusal{fmt.Errorf("certificate %s is not one of this CA's: %v", FormatSerial(cert.SerialNumber), err)}
	}
	if !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return nil, refusal{fmt.Errorf("certificate %s of %q is not a gateway certificate", FormatSerial(cert.SerialNumber), nameOf(cert))}
	}
	if now.After(cert.NotAfter) {
		return nil, refusal{fmt.Errorf("certificate %s of %q expired at %s: an expired certificate cannot be renewed; issue a new one with `skybridge ca issue`",
			FormatSerial(cert.SerialNumber), nameOf(cert), cert.NotAfter.UTC().Format(time.RFC3339))}
	}
	attrs, err := AttributesOf(cert)
	if err != nil {
		return nil, refusal{err}
	}
	if err := attrs.Validate(ca.MeshPrefix()); err != nil {
		return nil, refusal{err}
	}
	if attrs.IsBurst() {
		return nil, refusal{fmt.Errorf("%q is a burst gateway: its certificate lasts exactly its burst and is not renewed", attrs.Node)}
	}
	life := cert.NotAfter.Sub(cert.NotBefore)
	if due := cert.NotBefore.Add(life / 2); now.Before(due) {
		return nil, refusal{fmt.Errorf("certificate %s of %q is renewed from %s on, half way through its life", FormatSerial(cert.SerialNumber), attrs.Node, due.UTC().Format(time.RFC3339))}
	}
	csr, asked, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, refusal{err}
	}
	if !asked.Equal(attrs) {
		return nil, refusal{fmt.Errorf("a renewal certifies the attributes of the current certificate, and the request asks for others (certificate → request: %s); issue a new certificate with `skybridge ca issue` to change them",
			strings.Join(attrs.Differences(asked), ", "))}
	}
	if k, ok := csr.PublicKey.(*ecdsa.PublicKey); ok && k.Equal(cert.PublicKey) {
		return nil, refusal{errors.New("a renewal certifies a new key, and the request is for the current one")}
	}
	// As long as the certificate renewed lasted (issuers backdate by
	// a minute), but not past the CA's own end.
	ttl := min(life-backdate, ca.cert.NotAfter.Sub(now))
	if ttl < minTTL {
		return nil, refusal{fmt.Errorf("the mesh CA ends at %s: no certificate can be renewed under it; bring up a new mesh CA", ca.cert.NotAfter.UTC().Format(time.RFC3339))}
	}
	serial, key := FormatSerial(cert.SerialNumber), keyID(csr.RawSubjectPublicKeyInfo)
	return ca.issueGateway(IssueRequest{Attributes: *attrs, PublicKey: csr.PublicKey, TTL: ttl, Now: now}, serial, func(idx *caIndex) (*x509.Certificate, error) {
		// The CA's own record decides, not a revocation list that may
		// not have been written: the certificate must be the latest of
		// its gateway, so an older one (replaced by `ca issue` with other
		// routes, or copied before the holder renewed) brings back
		// nothing it certified. One issued but never delivered does not
		// count (TakeBack), nor does this certificate's own renewal for
		// the same key: its answer was lost, and it is asked again —
		// answered with the certificate issued then, however often it is
		// asked, or each ask would add one to the index.
		latest := -1
		for i, e := range idx.Certs {
			if e.Node == attrs.Node && (e.Kind == KindGateway || e.Kind == "") && !e.TakenBack {
				latest = i
			}
		}
		i := slices.IndexFunc(idx.Certs, func(e IssuedCert) bool { return e.Serial == serial })
		switch {
		case i < 0:
			return nil, fmt.Errorf("certificate %s of %q is not in the CA's index (issued from another copy of the CA directory?): issue it a new identity from this one with `skybridge ca issue`", serial, attrs.Node)
		case idx.Certs[i].RevokedAt != nil:
			return nil, fmt.Errorf("certificate %s of %q is revoked (%s): a revoked certificate is not renewed; issue the gateway a new identity with `skybridge ca issue`", serial, attrs.Node, idx.Certs[i].Reason)
		case latest < 0:
			return nil, fmt.Errorf("certificate %s of %q is not a gateway's in the CA's index: issue the gateway a new identity with `skybridge ca issue`", serial, attrs.Node)
		case i == latest:
		case idx.Certs[latest].RenewedFrom == serial && idx.Certs[latest].Key == key && idx.Certs[latest].RevokedAt == nil:
			// Issued by a release that did not keep it, or the index
			// damaged: certified once more, and kept from then on.
			return idx.renewal(idx.Certs[latest]), nil
		default:
			return nil, fmt.Errorf("certificate %s of %q is not its latest: certificate %s replaced it (if that renewal was not this gateway's, its key was copied: revoke them all with `skybridge ca revoke --node %s --reason keyCompromise` and issue it a new identity)",
				serial, attrs.Node, idx.Certs[latest].Serial, attrs.Node)
		}
		return nil, nil
	})
}

// keyID names a key in the CA's index: the SHA-256 of its
// SubjectPublicKeyInfo.
func keyID(spki []byte) string {
	sum := sha256.Sum256(spki)
	return hex.EncodeToString(sum[:])
}

// fileNodeKeyNext is the key a renewal through a CA-holding gateway asks
// to be certified, kept until its certificate is saved: a renewal whose
// answer was lost is asked again for the same key, which the CA then
// answers again (CA.Renew), rather than refused as a second renewal.
const fileNodeKeyNext = "node.key.next"

// fileRenewLock serializes renewals of one identity directory.
const fileRenewLock = ".renew.lock"

// pendingRenewalKey returns the key of a renewal under way of the
// certificate in dir, or makes and keeps a new one. The key file names
// the serial it renews: one kept from before the directory was issued
// a new identity (`ca issue --out`, after a compromise, say) is not
// asked for again.
func pendingRenewalKey(dir string) (*ecdsa.PrivateKey, error) {
	cur, err := LoadNodeIdentity(dir)
	if err != nil {
		return nil, err
	}
	serial := FormatSerial(cur.Certificate().SerialNumber)
	path := filepath.Join(dir, fileNodeKeyNext)
	b, err := ReadPrivateFile(path)
	if err == nil {
		if blk, _ := pem.Decode(b); blk != nil && blk.Headers[pemRenewsHeader] == serial {
			if k, err := parseKeyPEM(pem.EncodeToMemory(&pem.Block{Type: blk.Type, Bytes: blk.Bytes})); err == nil {
				return k, nil
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	// None, damaged (a write cut short before it was ever asked for), or
	// of another certificate: a new one.
	k, err := GenerateNodeKey()
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	out := pem.EncodeToMemory(&pem.Block{Type: pemKey, Headers: map[string]string{pemRenewsHeader: serial}, Bytes: der})
	if err := atomicfile.WriteFile(path, out, 0o600); err != nil {
		return nil, fmt.Errorf("keep the renewal's key: %w", err)
	}
	return k, nil
}

// pemRenewsHeader names, in a kept renewal key, the serial it renews.
const pemRenewsHeader = "Renews"

// renewedElsewhere returns the identity in dir if it is one for attrs
// that is valid and not due for renewal: renewed by another process
// (`skybridge identity request`) while the gateway ran on the certificate
// before it, which the CA no longer renews.
func renewedElsewhere(dir string, attrs *Attributes, tb *TrustBundle, now time.Time) *NodeIdentity {
	id, err := LoadNodeIdentity(dir)
	if err != nil || !id.Attributes().Equal(attrs) {
		return nil
	}
	if _, err := tb.VerifyCertificate(id.Certificate(), now); err != nil {
		return nil
	}
	if c := id.Certificate(); !now.Before(RenewalTime(c.NotBefore, c.NotAfter, 0)) {
		return nil
	}
	return id
}

// renewer renews a gateway's certificate through the enrollment endpoints
// of gateways that hold the mesh CA (identity.renew_from).
type renewer struct {
	endpoints []string // host:port
	dir       string
}

// Sign implements the part of Issuer a renewal needs. attrs are those of
// the current certificate, which the CA keeps; its life is the current
// one's, whatever ttl asks.
func (r *renewer) Sign(ctx context.Context, csrPEM []byte, attrs Attributes, _ time.Duration) (*x509.Certificate, error) {
	id, err := LoadNodeIdentity(r.dir)
	if err != nil {
		return nil, err
	}
	if !id.Attributes().Equal(&attrs) {
		return nil, fmt.Errorf("the certificate in %s certifies other attributes than the node block (certificate → node block: %s): a renewal keeps them; issue a new certificate with `skybridge ca issue`",
			r.dir, strings.Join(id.Attributes().Differences(&attrs), ", "))
	}
	tb, err := LoadTrustBundle(r.dir, netip.Prefix{})
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(RenewRequest{CSR: csrPEM})
	if err != nil {
		return nil, err
	}
	// A renewal at the start waits for this when the endpoint does not
	// answer, before the gateway starts on its current certificate.
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.TLSCertificate()},
		// The endpoint's certificate names its gateway, not the address
		// dialled: its chain to the mesh CA is what is checked.
		InsecureSkipVerify:    true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error { return verifyRenewer(raw, tb, time.Now()) },
	}}}
	defer client.CloseIdleConnections()
	var errs []error
	for _, ep := range r.endpoints {
		cert, err := r.post(ctx, client, ep, body)
		if err == nil {
			return r.check(cert, csrPEM, id)
		}
		if errors.Is(err, ErrIssueRefused) || ctx.Err() != nil {
			return nil, err
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("no renewal endpoint answered (identity.renew_from): %w", errors.Join(errs...))
}

func (r *renewer) post(ctx context.Context, client *http.Client, ep string, body []byte) (*x509.Certificate, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+ep+RenewPath, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ep, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ep, err)
	}
	switch {
	case resp.StatusCode == http.StatusForbidden:
		return nil, refusal{fmt.Errorf("renewal refused by %s: %s", ep, strings.TrimSpace(string(b)))}
	case resp.StatusCode != http.StatusOK:
		// 404 from a CA-holding gateway of an earlier release, 5xx: the
		// next endpoint may do.
		return nil, fmt.Errorf("%s: %s: %s", ep, resp.Status, strings.TrimSpace(string(b)))
	}
	var res RenewResponse
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, fmt.Errorf("%s: renewal answer: %w", ep, err)
	}
	certs, err := ParseCertificatesPEM(res.Certificate)
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("%s: renewal answer: expected one certificate (%v)", ep, err)
	}
	return certs[0], nil
}

// check makes sure the endpoint certified what was asked: the new key,
// and the attributes of the current certificate. The caller checks the
// chain and revocation (Provider.obtain).
func (r *renewer) check(cert *x509.Certificate, csrPEM []byte, cur *NodeIdentity) (*x509.Certificate, error) {
	csr, _, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	k, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !k.Equal(csr.PublicKey) {
		return nil, errors.New("the renewal endpoint certified another key than the one asked for")
	}
	got, err := AttributesOf(cert)
	if err != nil {
		return nil, fmt.Errorf("renewed certificate: %w", err)
	}
	if !got.Equal(cur.Attributes()) {
		return nil, fmt.Errorf("the renewal endpoint certified other attributes (current → renewed: %s)", strings.Join(cur.Attributes().Differences(got), ", "))
	}
	return cert, nil
}

// verifyRenewer checks that the renewal endpoint's certificate is an
// enrollment endpoint's (CA.IssueEnroller: server authentication only),
// chained to the mesh CA: only a holder of the CA key has one. Any
// gateway's certificate would do for server authentication, and one
// posing as the endpoint could refuse every renewal.
func verifyRenewer(raw [][]byte, tb *TrustBundle, now time.Time) error {
	if len(raw) == 0 {
		return errors.New("the renewal endpoint presented no certificate")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return fmt.Errorf("the renewal endpoint's certificate: %w", err)
	}
	if !slices.Contains(leaf.Subject.OrganizationalUnit, enrollerUnit) || slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return fmt.Errorf("the renewal endpoint presented the certificate of %q, which is not an enrollment endpoint's: is renew_from the address of the gateway holding the mesh CA?", nameOf(leaf))
	}
	inter := x509.NewCertPool()
	for _, b := range raw[1:] {
		if c, err := x509.ParseCertificate(b); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: tb.Roots(), Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return fmt.Errorf("the renewal endpoint is not certified by the mesh CA: %w", err)
	}
	if tb.IsRevoked(leaf.SerialNumber) {
		return fmt.Errorf("the renewal endpoint's certificate %s is revoked", FormatSerial(leaf.SerialNumber))
	}
	return nil
}

// checkRenewFrom validates identity.renew_from entries: host:port.
func checkRenewFrom(eps []string) error {
	for _, ep := range eps {
		host, port, err := net.SplitHostPort(ep)
		if _, perr := strconv.ParseUint(port, 10, 16); err != nil || host == "" || perr != nil || port == "0" {
			return fmt.Errorf("%q is not host:port, such as 198.51.100.1:7947 (the enrollment endpoint of the gateway holding the mesh CA)", ep)
		}
		// An https URL cannot carry a zone as written here, and every
		// renewal would fail, when the certificate is left to end.
		if strings.Contains(host, "%") {
			return fmt.Errorf("%q names a zone (%s): give an address that needs none, as the gateway holding the mesh CA advertises", ep, host[strings.Index(host, "%"):])
		}
	}
	return nil
}
