package clustersync

import (
	"encoding/base64"
	"testing"

	corev1 "k8s.io/api/core/v1"
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
