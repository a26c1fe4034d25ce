package testenv

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

// StartDoH serves DNS over HTTPS (RFC 8484, POST) on 127.0.0.1 with the given TXT records, keyed by
// fully qualified name ("_dnslink.images.example.test."); every other name is NXDOMAIN. kubo takes it
// as a resolver for a domain (DNS.Resolvers), which is how tests give it DNSLink records.
func StartDoH(t testing.TB, txt map[string][]string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		var q dns.Msg
		if err != nil || q.Unpack(body) != nil || len(q.Question) != 1 {
			http.Error(w, "bad query", http.StatusBadRequest)
			return
		}
		var m dns.Msg
		m.SetReply(&q)
		question := q.Question[0]
		values, ok := txt[strings.ToLower(question.Name)]
		switch {
		case !ok:
			m.Rcode = dns.RcodeNameError
		case question.Qtype == dns.TypeTXT:
			for _, v := range values {
				m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60}, Txt: []string{v}})
			}
		}
		out, err := m.Pack()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/dns-message")
		_, _ = w.Write(out) // the resolver that asked reports a short answer itself
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/dns-query"
}
