package clustersync

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// credentials reads a username and password from a Secret: the keys username and password, or a
// kubernetes.io/dockerconfigjson Secret's entry for the registry.
func credentials(sec *corev1.Secret, hosts ...string) (string, string, error) {
	if u, ok := sec.Data["username"]; ok {
		return string(u), string(sec.Data["password"]), nil
	}
	raw, ok := sec.Data[corev1.DockerConfigJsonKey]
	if !ok {
		return "", "", errors.New("neither username/password nor .dockerconfigjson")
	}
	var cfg struct {
		Auths map[string]struct {
			Username string `json:"username"`
			Password string `json:"password"`
			Auth     string `json:"auth"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return "", "", fmt.Errorf(".dockerconfigjson: %w", err)
	}
	for key, a := range cfg.Auths {
		k := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://"), "/")
		if !slices.Contains(hosts, k) && (k != "index.docker.io/v1" || !slices.Contains(hosts, "docker.io")) {
			continue
		}
		if a.Username != "" {
			return a.Username, a.Password, nil
		}
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return "", "", fmt.Errorf(".dockerconfigjson auth for %s: %w", key, err)
		}
		user, pass, _ := strings.Cut(string(b), ":")
		return user, pass, nil
	}
	return "", "", fmt.Errorf(".dockerconfigjson has no entry for %s", strings.Join(hosts, " or "))
}
