package agent

import (
	"context"
	"encoding/base64"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/imagemesh/imagemesh/pkg/hostconfig"
)

func TestCredentialsFromSecrets(t *testing.T) {
	b64 := base64.StdEncoding.EncodeToString([]byte("robot:s3cret:with:colons"))
	for name, tc := range map[string]struct {
		data       map[string]string
		hosts      []string
		user, pass string
		fails      bool
	}{
		"keys":               {data: map[string]string{"username": "u", "password": "p"}, hosts: []string{"a.test"}, user: "u", pass: "p"},
		"dockerconfigjson":   {data: map[string]string{".dockerconfigjson": `{"auths":{"a.test":{"username":"u","password":"p"}}}`}, hosts: []string{"a.test"}, user: "u", pass: "p"},
		"auth field":         {data: map[string]string{".dockerconfigjson": `{"auths":{"https://a.test/":{"auth":"` + b64 + `"}}}`}, hosts: []string{"a.test"}, user: "robot", pass: "s3cret:with:colons"},
		"docker hub legacy":  {data: map[string]string{".dockerconfigjson": `{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p"}}}`}, hosts: []string{"docker.io", "registry-1.docker.io"}, user: "u", pass: "p"},
		"endpoint host":      {data: map[string]string{".dockerconfigjson": `{"auths":{"mirror.test:5000":{"username":"u","password":"p"}}}`}, hosts: []string{"a.test", "mirror.test:5000"}, user: "u", pass: "p"},
		"no entry":           {data: map[string]string{".dockerconfigjson": `{"auths":{"b.test":{"username":"u","password":"p"}}}`}, hosts: []string{"a.test"}, fails: true},
		"neither":            {data: map[string]string{"token": "x"}, hosts: []string{"a.test"}, fails: true},
		"bad json":           {data: map[string]string{".dockerconfigjson": `{`}, hosts: []string{"a.test"}, fails: true},
		"bad base64 in auth": {data: map[string]string{".dockerconfigjson": `{"auths":{"a.test":{"auth":"***"}}}`}, hosts: []string{"a.test"}, fails: true},
	} {
		sec := &corev1.Secret{Data: map[string][]byte{}}
		for k, v := range tc.data {
			sec.Data[k] = []byte(v)
		}
		user, pass, err := credentials(sec, tc.hosts...)
		if tc.fails {
			if err == nil {
				t.Errorf("%s: no error", name)
			}
			continue
		}
		if err != nil || user != tc.user || pass != tc.pass {
			t.Errorf("%s: %q %q %v, want %q %q", name, user, pass, err, tc.user, tc.pass)
		}
	}
}

// TestCleanupKeepsFilesWhileDaemonSetLives: a stop of one agent while its DaemonSet lives (rolling
// update, drain) keeps the node's hosts.toml; once the DaemonSet is gone or going (uninstall), or
// without a DaemonSet to ask, the files go. The real path runs in TestMultiNodeCluster.
func TestCleanupKeepsFilesWhileDaemonSetLives(t *testing.T) {
	now := metav1.Now()
	for name, tc := range map[string]struct {
		daemonSet string
		objects   []runtime.Object
		kept      bool
	}{
		"lives":            {daemonSet: "ns/agent", objects: []runtime.Object{&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "agent"}}}, kept: true},
		"gone":             {daemonSet: "ns/agent"},
		"being deleted":    {daemonSet: "ns/agent", objects: []runtime.Object{&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "agent", DeletionTimestamp: &now, Finalizers: []string{"foregroundDeletion"}}}}},
		"another one":      {daemonSet: "ns/agent", objects: []runtime.Object{&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "other"}}}},
		"no daemonset set": {objects: []runtime.Object{&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "agent"}}}},
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if _, err := hostconfig.Apply(dir, []hostconfig.Registry{{Host: "a.test", Mirrors: []hostconfig.Mirror{{URL: "http://127.0.0.1:5000"}}}}); err != nil {
				t.Fatal(err)
			}
			c := &clusterSync{client: fake.NewSimpleClientset(tc.objects...), hostsDir: dir, daemonSet: tc.daemonSet, log: slog.New(slog.DiscardHandler)}
			c.cleanup(context.Background())
			_, err := os.Stat(filepath.Join(dir, "a.test", "hosts.toml"))
			if kept := err == nil; kept != tc.kept {
				t.Fatalf("hosts.toml kept = %v, want %v", kept, tc.kept)
			}
		})
	}
}
