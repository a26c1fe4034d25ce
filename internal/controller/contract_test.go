package controller

import (
	"testing"

	imagemeshv1alpha1 "github.com/imagemesh/imagemesh/api/v1alpha1"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
)

// TestSourceTypesMatchTheAgents: the controller copies an ImageSource's source type into the mirror
// configuration as it is, and the agents, which do not import the API, compare it with
// mirrorconfig's constants.
func TestSourceTypesMatchTheAgents(t *testing.T) {
	for api, agent := range map[imagemeshv1alpha1.SourceType]string{
		imagemeshv1alpha1.SourceStorj: mirrorconfig.SourceStorj,
		imagemeshv1alpha1.SourceIPFS:  mirrorconfig.SourceIPFS,
	} {
		if string(api) != agent {
			t.Errorf("ImageSource source type %q, agents expect %q", api, agent)
		}
	}
}
