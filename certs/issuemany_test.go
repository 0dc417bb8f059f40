package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestIssueMany: several certificates issued under one write of the
// index, each judged as Issue judges it, against the index with those
// before it issued: one refused (an address another of them took) leaves
// the others.
func TestIssueMany(t *testing.T) {
	ca := newTestCA(t)
	key := func() *ecdsa.PublicKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return &k.PublicKey
	}
	reqs := []IssueRequest{
		{Attributes: testAttrs("b-gw1", "b", "100.96.255.254", "10.9.0.0/16"), PublicKey: key(), TTL: time.Hour, Now: t0},
		{Attributes: testAttrs("b-gw2", "b", "100.96.255.254", "10.9.0.0/16"), PublicKey: key(), TTL: time.Hour, Now: t0}, // gw1's address
		{Attributes: testAttrs("b-gw3", "b", "100.96.255.253", "10.9.0.0/16"), PublicKey: key(), TTL: -time.Hour, Now: t0},
		{Attributes: testAttrs("b-gw4", "b", "100.96.255.252", "10.9.0.0/16"), PublicKey: key(), TTL: time.Hour, Now: t0},
	}
	before, err := os.Stat(filepath.Join(ca.Dir(), fileIndex))
	if err != nil {
		t.Fatal(err)
	}
	issued, errs, err := ca.IssueMany(reqs)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{true, false, false, true} {
		if got := errs[i] == nil && issued[i] != nil; got != want {
			t.Errorf("request %d: issued %v (%v), want %v", i, got, errs[i], want)
		}
		if !want && !errors.Is(errs[i], ErrIssueRefused) {
			t.Errorf("request %d: %v, want a refusal", i, errs[i])
		}
	}
	all, err := ca.Issued()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || all[0].Node != "b-gw1" || all[1].Node != "b-gw4" || all[0].Serial != FormatSerial(issued[0].SerialNumber) {
		t.Fatalf("the index holds %+v; want b-gw1's and b-gw4's certificates", all)
	}
	if after, err := os.Stat(filepath.Join(ca.Dir(), fileIndex)); err != nil || os.SameFile(before, after) {
		t.Fatalf("the index was not written (%v)", err)
	}

	// Every one refused: the index is not written.
	before, _ = os.Stat(filepath.Join(ca.Dir(), fileIndex))
	if _, errs, err := ca.IssueMany(reqs[1:3]); err != nil || errs[0] == nil || errs[1] == nil {
		t.Fatalf("every one refused: %v, %v", errs, err)
	}
	if after, err := os.Stat(filepath.Join(ca.Dir(), fileIndex)); err != nil || !os.SameFile(before, after) {
		t.Fatalf("the index was written for nothing (%v)", err)
	}
}
