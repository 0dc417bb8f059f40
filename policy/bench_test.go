package policy

import (
	"testing"
)

// Decisions against the shipped bank policy. Gateways decide per tunnel
// and per migration, so this must stay in the low microseconds.
//
//	go test -run '^$' -bench Evaluate -benchmem ./policy/

func benchPolicy(b *testing.B) (*Policy, Inventory) {
	p, _, err := Load("../docs/examples/residency.hcl")
	if err != nil {
		b.Fatal(err)
	}
	inv, err := LoadInventory("../docs/examples/sites.hcl")
	if err != nil {
		b.Fatal(err)
	}
	return p, inv
}

func benchEvaluate(b *testing.B, class string, a Action, sites ...string) {
	p, inv := benchPolicy(b)
	ss, err := inv.Lookup(sites)
	if err != nil {
		b.Fatal(err)
	}
	req := Request{Class: class, Action: a, Sites: ss, Time: nov24}
	b.ReportAllocs()
	for b.Loop() {
		p.Evaluate(req)
	}
}

func BenchmarkEvaluateStoreAllow(b *testing.B) {
	benchEvaluate(b, "pii-eu", Store, "aws-eu-central-1")
}

func BenchmarkEvaluateStoreDeny(b *testing.B) {
	benchEvaluate(b, "swiss-banking-secret", Store, "aws-us-east-1")
}

func BenchmarkEvaluateStoreException(b *testing.B) {
	benchEvaluate(b, "pii-eu", Store, "aws-us-east-1")
}

func BenchmarkEvaluateTransitPath(b *testing.B) {
	benchEvaluate(b, "pii-eu", Transit, "onprem-zrh", "aws-eu-central-1")
}

func BenchmarkParseExample(b *testing.B) {
	_, src, err := Load("../docs/examples/residency.hcl")
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse("residency.hcl", src); err != nil {
			b.Fatal(err)
		}
	}
}
