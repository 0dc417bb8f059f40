package certs

import (
	"crypto"
	"crypto/ecdsa"
	"fmt"
	"io"
	"log/slog"
)

const redacted = "[redacted]"

// secret is embedded by every type that holds private key material so that
// fmt (every verb, including %#v and %x) and log/slog print a placeholder
// instead of the secret. Types that want to show their public half override
// Format and LogValue themselves.
type secret struct{}

func (secret) Format(f fmt.State, _ rune) { fmt.Fprint(f, redacted) }
func (secret) String() string             { return redacted }
func (secret) GoString() string           { return redacted }
func (secret) LogValue() slog.Value       { return slog.StringValue(redacted) }

// signer exposes a private key only through crypto.Signer, so handing it to
// TLS or a signing function never lets the key be printed or logged.
type signer struct {
	secret
	k *ecdsa.PrivateKey
}

func (s signer) Public() crypto.PublicKey { return s.k.Public() }

func (s signer) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.k.Sign(rand, digest, opts)
}
