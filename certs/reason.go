package certs

import (
	"errors"
	"fmt"
)

// Reason says why an identity or advertisement was refused. Reasons are
// stable strings: they become metric labels and audit fields.
type Reason string

const (
	ReasonMalformed         Reason = "malformed"          // bytes do not decode
	ReasonUnknownCA         Reason = "unknown_ca"         // certificate does not chain to the mesh CA
	ReasonExpired           Reason = "expired"            // certificate (or its CA) has expired
	ReasonNotYetValid       Reason = "not_yet_valid"      // certificate is not valid yet
	ReasonRevoked           Reason = "revoked"            // certificate serial is on the CA's revocation list
	ReasonBadCertificate    Reason = "bad_certificate"    // certificate chains but is not a valid gateway certificate
	ReasonCertMismatch      Reason = "cert_mismatch"      // advert names a different certificate than the one given
	ReasonBadSignature      Reason = "bad_signature"      // advert signature does not verify with the certificate key
	ReasonAttributeMismatch Reason = "attribute_mismatch" // advert claims something its certificate does not grant
	ReasonUnprovenKey       Reason = "unproven_key"       // advert's proof that its gateway holds its WireGuard key does not verify
	ReasonReplay            Reason = "replay"             // advert is not newer than one already accepted
	ReasonClockSkew         Reason = "clock_skew"         // advert is signed in the future
)

// VerifyError is a refusal with its Reason. errors.Is(err, ErrRevoked) and
// friends match on the reason alone.
type VerifyError struct {
	Reason Reason
	Detail string
}

func (e *VerifyError) Error() string {
	if e.Detail == "" {
		return "identity refused: " + string(e.Reason)
	}
	return fmt.Sprintf("identity refused (%s): %s", e.Reason, e.Detail)
}

// Is matches any VerifyError with the same reason.
func (e *VerifyError) Is(target error) bool {
	t, ok := target.(*VerifyError)
	return ok && t.Reason == e.Reason
}

// Sentinels for errors.Is.
var (
	ErrMalformed         = &VerifyError{Reason: ReasonMalformed}
	ErrUnknownCA         = &VerifyError{Reason: ReasonUnknownCA}
	ErrExpired           = &VerifyError{Reason: ReasonExpired}
	ErrNotYetValid       = &VerifyError{Reason: ReasonNotYetValid}
	ErrRevoked           = &VerifyError{Reason: ReasonRevoked}
	ErrBadCertificate    = &VerifyError{Reason: ReasonBadCertificate}
	ErrCertMismatch      = &VerifyError{Reason: ReasonCertMismatch}
	ErrBadSignature      = &VerifyError{Reason: ReasonBadSignature}
	ErrAttributeMismatch = &VerifyError{Reason: ReasonAttributeMismatch}
	ErrUnprovenKey       = &VerifyError{Reason: ReasonUnprovenKey}
	ErrReplay            = &VerifyError{Reason: ReasonReplay}
	ErrClockSkew         = &VerifyError{Reason: ReasonClockSkew}
)

func refuse(r Reason, format string, args ...any) *VerifyError {
	return &VerifyError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// ReasonOf extracts the refusal reason from err, or "" if err is not a
// refusal.
func ReasonOf(err error) Reason {
	var ve *VerifyError
	if errors.As(err, &ve) {
		return ve.Reason
	}
	return ""
}
