// Package hclconf loads HCL configuration files with errors that name the
// file, line and field, so an operator can fix a typo without reading code.
package hclconf

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/gohcl"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"
	"github.com/zclconf/go-cty/cty/convert"
)

// DecodeFile parses the configuration file at path into v (a pointer to a
// struct with hcl tags), refusing a key given twice in one object (see
// DecodeNotingDuplicates).
func DecodeFile(path string, v any) error {
	src, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read configuration: %w", err)
	}
	dups, err := DecodeNotingDuplicates(path, src, v)
	if err != nil {
		return err
	}
	return Diagnostics(dups)
}

// Decode parses src, named filename in errors, into v.
func Decode(filename string, src []byte, v any) error {
	_, err := DecodeNotingDuplicates(filename, src, v)
	return err
}

// DecodeNotingDuplicates is Decode, which also returns, without failing,
// each key given twice in one object of src ({ classes = "a", classes =
// "b" }): HCL keeps the last without a word, and a label that decides
// what data a site may hold must not be decided by the order of two
// lines. A configuration refuses them (DecodeFile); a policy is read as it
// was signed, and lint names them.
func DecodeNotingDuplicates(filename string, src []byte, v any) (hcl.Diagnostics, error) {
	f, diags := hclsyntax.ParseConfig(src, filename, hcl.InitialPos)
	if diags.HasErrors() {
		return nil, Diagnostics(diags)
	}
	if diags := gohcl.DecodeBody(f.Body, nil, v); diags.HasErrors() {
		return nil, Diagnostics(diags)
	}
	return duplicateKeys(f.Body.(*hclsyntax.Body)), nil
}

func duplicateKeys(body *hclsyntax.Body) hcl.Diagnostics {
	var diags hcl.Diagnostics
	hclsyntax.VisitAll(body, func(n hclsyntax.Node) hcl.Diagnostics {
		obj, ok := n.(*hclsyntax.ObjectConsExpr)
		if !ok {
			return nil
		}
		seen := map[string]bool{}
		for _, item := range obj.Items {
			k, kd := item.KeyExpr.Value(nil)
			if kd.HasErrors() || !k.IsKnown() || k.IsNull() {
				continue // not a literal key: decoding says what is wrong
			}
			// As HCL makes the map: a number key is its string (1 and
			// "1", and 1.0, are one key).
			k, err := convert.Convert(k, cty.String)
			if err != nil || k.IsNull() {
				continue
			}
			key := k.AsString()
			if seen[key] {
				r := item.KeyExpr.Range()
				diags = append(diags, &hcl.Diagnostic{Severity: hcl.DiagError, Summary: fmt.Sprintf("key %q given twice in this object", key),
					Detail: "give it once: only one of the values would count", Subject: &r})
			}
			seen[key] = true
		}
		return nil
	})
	return diags
}

// Diagnostics turns HCL diagnostics into one error, one line per problem,
// each starting with file:line:column.
func Diagnostics(diags hcl.Diagnostics) error {
	var errs []error
	for _, d := range diags {
		if d.Severity != hcl.DiagError {
			continue
		}
		msg := d.Summary
		if d.Detail != "" {
			msg += ": " + d.Detail
		}
		if d.Subject != nil {
			msg = fmt.Sprintf("%s:%d:%d: %s", d.Subject.Filename, d.Subject.Start.Line, d.Subject.Start.Column, msg)
		}
		errs = append(errs, errors.New(msg))
	}
	return errors.Join(errs...)
}

// Errorf reports a problem with the attribute named attr of a block whose
// body was captured with an `hcl:",body"` field, prefixed with the
// attribute's position (or the block's, if the attribute is absent).
func Errorf(body hcl.Body, attr, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if r, ok := AttrRange(body, attr); ok {
		return fmt.Errorf("%s:%d:%d: %s: %s", r.Filename, r.Start.Line, r.Start.Column, attr, msg)
	}
	if sb, ok := body.(*hclsyntax.Body); ok {
		r := sb.SrcRange
		return fmt.Errorf("%s:%d: %s: %s", r.Filename, r.Start.Line, attr, msg)
	}
	return fmt.Errorf("%s: %s", attr, msg)
}

// AttrRange finds where attr is defined in body.
func AttrRange(body hcl.Body, attr string) (hcl.Range, bool) {
	sb, ok := body.(*hclsyntax.Body)
	if !ok {
		return hcl.Range{}, false
	}
	a, ok := sb.Attributes[attr]
	if !ok {
		return hcl.Range{}, false
	}
	return a.SrcRange, true
}

// Join combines validation errors; nil if there are none. Errors are kept
// in file order because each starts with its position.
func Join(errs ...error) error {
	var keep []error
	for _, e := range errs {
		if e != nil {
			keep = append(keep, e)
		}
	}
	if len(keep) == 0 {
		return nil
	}
	msgs := make([]string, len(keep))
	for i, e := range keep {
		msgs[i] = e.Error()
	}
	return errors.New(strings.Join(msgs, "\n"))
}
