package certs

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"
)

// joinTokenPrefix starts every join token, so a token pasted into the
// wrong place is recognised, and a later format can change it.
const joinTokenPrefix = "sbj1."

// JoinToken lets one fresh gateway enrol once into a burst site. It
// carries everything the newcomer needs to find and trust an enrolling
// gateway before it has any identity: where to connect, and the SHA-256 of
// the mesh CA's public key, so the enrolling gateway's certificate is
// checked against the CA the token was made for (as kubeadm pins its
// cluster CA), not against whatever a network in between presents. The
// secret half proves the newcomer holds the token; the enrolling gateway
// keeps only its hash.
type JoinToken struct {
	ID        string           // public: names the token in logs and state
	Secret    []byte           // 32 random bytes
	CAPin     [32]byte         // SHA-256 of the CA certificate's SubjectPublicKeyInfo
	Endpoints []netip.AddrPort // enrollment endpoints to try, in order
	Site      string           // the burst site it enrols into (informational: the enrolling side decides)
	Expires   time.Time        // the enrolling side refuses it afterwards
	// Vault, if set, makes this a Vault join token: the newcomer logs in
	// to Vault with the AppRole it names instead of asking a gateway, and
	// Secret, CAPin and Endpoints are unused.
	Vault *VaultJoin
	// Enroller is the node name of the gateway that enrols: any gateway
	// of the mesh has a certificate of the pinned CA, and only this one
	// may answer (tokens of releases before it name none).
	Enroller string
}

type joinTokenJSON struct {
	ID        string     `json:"id"`
	Secret    string     `json:"s"`
	CAPin     string     `json:"ca"`
	Endpoints []string   `json:"ep"`
	Site      string     `json:"site"`
	Expires   int64      `json:"exp"`
	Vault     *VaultJoin `json:"vault,omitempty"`
	Enroller  string     `json:"enroller,omitempty"`
}

// NewJoinToken makes a token for site, pinned to ca, valid until expires.
func NewJoinToken(site string, ca *x509.Certificate, endpoints []netip.AddrPort, expires time.Time) (*JoinToken, error) {
	if len(endpoints) == 0 {
		return nil, errors.New("a join token needs at least one enrollment endpoint")
	}
	id := make([]byte, 8)
	sec := make([]byte, 32)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	if _, err := rand.Read(sec); err != nil {
		return nil, err
	}
	return &JoinToken{ID: hex.EncodeToString(id), Secret: sec, CAPin: CAPin(ca), Endpoints: endpoints, Site: site, Expires: expires.Truncate(time.Second)}, nil
}

// CAPin is the pin of a CA certificate: the SHA-256 of its public key.
func CAPin(ca *x509.Certificate) [32]byte { return sha256.Sum256(ca.RawSubjectPublicKeyInfo) }

// NewVaultJoinToken makes a Vault join token for site.
func NewVaultJoinToken(site string, vj *VaultJoin, expires time.Time) (*JoinToken, error) {
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	return &JoinToken{ID: hex.EncodeToString(id), Site: site, Expires: expires.Truncate(time.Second), Vault: vj}, nil
}

// Encode returns the token as one line of text. It is a secret.
func (t *JoinToken) Encode() string {
	j := joinTokenJSON{ID: t.ID, Site: t.Site, Expires: t.Expires.Unix(), Vault: t.Vault, Enroller: t.Enroller}
	if t.Vault == nil {
		j.Secret, j.CAPin = base64.RawURLEncoding.EncodeToString(t.Secret), hex.EncodeToString(t.CAPin[:])
	}
	for _, e := range t.Endpoints {
		j.Endpoints = append(j.Endpoints, e.String())
	}
	b, _ := json.Marshal(j)
	return joinTokenPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// ParseJoinToken decodes a token made by Encode. It does not judge its
// expiry: see Expired.
func ParseJoinToken(s string) (*JoinToken, error) {
	s = strings.TrimSpace(s)
	body, ok := strings.CutPrefix(s, joinTokenPrefix)
	if !ok {
		return nil, fmt.Errorf("not a skybridge join token (they start with %q): copy the whole line `skybridge burst up` printed", joinTokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return nil, errors.New("join token is damaged (not base64url): copy the whole line `skybridge burst up` printed")
	}
	var j joinTokenJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, errors.New("join token is damaged: copy the whole line `skybridge burst up` printed")
	}
	t := &JoinToken{ID: j.ID, Site: j.Site, Expires: time.Unix(j.Expires, 0), Vault: j.Vault, Enroller: j.Enroller}
	var errs []error
	if len(j.ID) != 16 {
		errs = append(errs, errors.New("its id is malformed"))
	}
	if !nameRE.MatchString(t.Site) {
		errs = append(errs, fmt.Errorf("its site %q is not a valid name", t.Site))
	}
	if v := j.Vault; v != nil {
		if v.Address == "" || v.RoleID == "" || v.WrappedSecretID == "" || v.PKIRole == "" {
			errs = append(errs, errors.New("its Vault part lacks the address, role or wrapped SecretID"))
		}
		if err := v.Node.Validate(netip.Prefix{}); err != nil {
			errs = append(errs, fmt.Errorf("its node attributes are not valid: %w", err))
		} else if v.Node.Site != t.Site {
			errs = append(errs, fmt.Errorf("its node is of site %q, not the token's %q", v.Node.Site, t.Site))
		}
		if err := errors.Join(errs...); err != nil {
			return nil, fmt.Errorf("join token is damaged: %w", err)
		}
		return t, nil
	}
	if t.Secret, err = base64.RawURLEncoding.DecodeString(j.Secret); err != nil || len(t.Secret) != 32 {
		errs = append(errs, errors.New("its secret is malformed"))
	}
	if pin, err := hex.DecodeString(j.CAPin); err != nil || len(pin) != 32 {
		errs = append(errs, errors.New("its CA pin is malformed"))
	} else {
		copy(t.CAPin[:], pin)
	}
	for _, e := range j.Endpoints {
		ap, err := netip.ParseAddrPort(e)
		if err != nil {
			errs = append(errs, fmt.Errorf("endpoint %q is not an address:port", e))
			continue
		}
		t.Endpoints = append(t.Endpoints, ap)
	}
	if len(t.Endpoints) == 0 {
		errs = append(errs, errors.New("it names no enrollment endpoint"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("join token is damaged: %w", err)
	}
	return t, nil
}

// Expired reports whether the token has expired at now.
func (t *JoinToken) Expired(now time.Time) bool { return !now.Before(t.Expires) }

// SecretHash is what the enrolling side stores instead of the secret.
func (t *JoinToken) SecretHash() [32]byte { return sha256.Sum256(t.Secret) }

// MatchesSecretHash reports, in constant time, whether secret hashes to h.
func MatchesSecretHash(secret []byte, h [32]byte) bool {
	got := sha256.Sum256(secret)
	return subtle.ConstantTimeCompare(got[:], h[:]) == 1
}

// ErrEnrollerNotTrusted is the error of VerifyEnroller: the enrolling
// side is not who the token says.
var ErrEnrollerNotTrusted = errors.New("enrolling gateway not trusted")

// VerifyEnroller checks the certificate chain an enrolling gateway
// presented (leaf first, then its CA): the CA must be the one the token
// pins, the leaf a gateway certificate it signed, valid at now, of the
// gateway the token names.
func (t *JoinToken) VerifyEnroller(chain [][]byte, now time.Time) error {
	if len(chain) < 2 {
		return fmt.Errorf("%w: it presented no CA certificate", ErrEnrollerNotTrusted)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return fmt.Errorf("%w: its certificate: %v", ErrEnrollerNotTrusted, err)
	}
	roots := x509.NewCertPool()
	pinned := false
	for _, der := range chain[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			continue
		}
		if CAPin(c) == t.CAPin {
			roots.AddCert(c)
			pinned = true
		}
	}
	if !pinned {
		return fmt.Errorf("%w: its CA is not the one the join token pins (wrong endpoint, or someone in between)", ErrEnrollerNotTrusted)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return fmt.Errorf("%w: its certificate does not chain to the pinned CA: %v", ErrEnrollerNotTrusted, err)
	}
	if t.Enroller != "" {
		attrs, err := AttributesOf(leaf)
		if err != nil {
			return fmt.Errorf("%w: its certificate: %v", ErrEnrollerNotTrusted, err)
		}
		if attrs.Node != t.Enroller {
			return fmt.Errorf("%w: it is %s, and the join token names %s (someone in between, holding another gateway's key?)", ErrEnrollerNotTrusted, attrs.Node, t.Enroller)
		}
	}
	return nil
}

// String names the token without its secret. It, Format, LogValue and
// MarshalJSON take the token as a value: a copy, a slice of tokens or a
// struct holding one prints no secret either (Encode is the way to write
// the token whole).
func (t JoinToken) String() string {
	return fmt.Sprintf("join token %s for site %s (expires %s)", t.ID, t.Site, t.Expires.UTC().Format(time.RFC3339))
}

// Format prints String for every verb, so %#v cannot print the secret.
func (t JoinToken) Format(f fmt.State, _ rune) { fmt.Fprint(f, t.String()) }

// LogValue logs the token's public half.
func (t JoinToken) LogValue() slog.Value {
	return slog.GroupValue(slog.String("id", t.ID), slog.String("site", t.Site), slog.Time("expires", t.Expires))
}

// MarshalJSON writes the token's public half (slog's JSON handler, a
// response holding the token).
func (t JoinToken) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		ID      string    `json:"id"`
		Site    string    `json:"site"`
		Expires time.Time `json:"expires"`
	}{t.ID, t.Site, t.Expires})
}
