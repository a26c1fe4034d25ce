package imagebuild

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The chart's default images (image.repository, appVersion), the kustomize bases under config/ and
// what `make images` builds name the same images.
func TestImagesAgree(t *testing.T) {
	repo, tag, err := ChartDefaults("../../charts/imagemesh")
	if err != nil {
		t.Fatal(err)
	}
	built := map[string]bool{}
	for _, c := range Commands {
		built[repo+"/"+c.Name+":"+tag] = true
	}

	// The chart names an image as include "imagemesh.image" (dict "root" . "name" "<name>"):
	// <image.repository>/<name>:<tag, or appVersion>.
	var charted []string
	templates, _ := filepath.Glob("../../charts/imagemesh/templates/*.yaml")
	re := regexp.MustCompile(`include "imagemesh\.image" \(dict "root" \. "name" "([^"]+)"\)`)
	for _, f := range templates {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllSubmatch(b, -1) {
			charted = append(charted, string(m[1]))
			if ref := repo + "/" + string(m[1]) + ":" + tag; !built[ref] {
				t.Errorf("%s: the chart runs %s, which make images does not build", f, ref)
			}
		}
	}
	slices.Sort(charted)
	if !slices.Equal(charted, []string{"controller", "node-agent"}) {
		t.Errorf("the chart's templates name the images %v, want controller and node-agent", charted)
	}

	var configured []string
	err = filepath.WalkDir("../../config", func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".yaml") {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if filepath.Base(p) == "kustomization.yaml" && bytes.Contains(b, []byte("\nimages:")) {
			t.Errorf("%s renames images: name them in the workloads, where this test reads them", p)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
		for {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return err
			}
			var w struct {
				Spec struct {
					Template struct {
						Spec struct {
							Containers, InitContainers []struct{ Image string }
						}
					}
				}
			}
			if err := yaml.Unmarshal(doc, &w); err != nil {
				return err
			}
			for _, c := range append(w.Spec.Template.Spec.InitContainers, w.Spec.Template.Spec.Containers...) {
				configured = append(configured, c.Image)
				if !built[c.Image] {
					t.Errorf("%s runs %s; make images builds %v (the chart's image.repository and appVersion)", p, c.Image, slices.Sorted(maps.Keys(built)))
				}
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(configured) != 2 {
		t.Errorf("config/ runs %v, want the agent and the controller", configured)
	}
}
