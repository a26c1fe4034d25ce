package controller_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	imagemeshv1alpha1 "github.com/imagemesh/imagemesh/api/v1alpha1"
	"github.com/imagemesh/imagemesh/internal/controller"
	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/internal/testenv/kubeenv"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
)

const ns = "imagemesh-system"

type env struct {
	t *testing.T
	c client.Client
}

// start runs a real API server with the CRDs and the controller against it.
func start(t *testing.T) *env {
	kube := kubeenv.Start(t, "../../config/crd/bases")
	scheme := controller.NewScheme()
	c, err := client.New(kube.Config, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	mgr, err := ctrl.NewManager(kube.Config, ctrl.Options{Scheme: scheme, Metrics: metricsserver.Options{BindAddress: "0"},
		// Each test runs its own manager in this process.
		Controller: config.Controller{SkipNameValidation: ptr.To(true)}})
	if err != nil {
		t.Fatal(err)
	}
	r := &controller.ImageSourceReconciler{
		Client: mgr.GetClient(), Namespace: ns, Recorder: mgr.GetEventRecorderFor("imagemesh-controller"),
		Probe: controller.HTTPProbe(&http.Client{Timeout: 2 * time.Second}),
	}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	})
	return &env{t: t, c: c}
}

func (e *env) create(obj client.Object) {
	e.t.Helper()
	if err := e.c.Create(context.Background(), obj); err != nil {
		e.t.Fatalf("create %s: %v", obj.GetName(), err)
	}
}

// eventually polls cond until it returns nil, and fails with its last error after a while.
func (e *env) eventually(what string, cond func() error) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *env) imageSource(name string) *imagemeshv1alpha1.ImageSource {
	e.t.Helper()
	var is imagemeshv1alpha1.ImageSource
	if err := e.c.Get(context.Background(), types.NamespacedName{Name: name}, &is); err != nil {
		e.t.Fatal(err)
	}
	return &is
}

// condition waits until the ImageSource's current generation has condition typ with reason.
func (e *env) condition(name, typ, reason string) metav1.Condition {
	e.t.Helper()
	var got metav1.Condition
	e.eventually(name+" "+typ+"="+reason, func() error {
		is := e.imageSource(name)
		c := meta.FindStatusCondition(is.Status.Conditions, typ)
		if c == nil || c.Reason != reason || c.ObservedGeneration != is.Generation || is.Status.ObservedGeneration != is.Generation {
			return errors.New(strings.TrimSpace(strings.Join([]string{"conditions:", conditionsString(is.Status.Conditions)}, " ")))
		}
		got = *c
		return nil
	})
	return got
}

func conditionsString(cs []metav1.Condition) string {
	var b strings.Builder
	for _, c := range cs {
		b.WriteString(c.Type + "=" + string(c.Status) + "/" + c.Reason + " (" + c.Message + ") ")
	}
	return b.String()
}

func (e *env) published() (mirrorconfig.Document, string) {
	e.t.Helper()
	var cm corev1.ConfigMap
	if err := e.c.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: "imagemesh-mirrors"}, &cm); err != nil {
		return mirrorconfig.Document{}, ""
	}
	doc, err := mirrorconfig.Parse([]byte(cm.Data[mirrorconfig.ConfigMapKey]))
	if err != nil {
		e.t.Fatal(err)
	}
	return doc, cm.Annotations[controller.AppliedAnnotation]
}

func (e *env) owner(host string) string {
	doc, _ := e.published()
	for _, r := range doc.Registries {
		if r.Host == host {
			return r.ImageSource
		}
	}
	return ""
}

// agentApplied records, as the node's agent does, that it applied the configuration with hash.
func (e *env) agentApplied(node, hash string) {
	e.t.Helper()
	ctx := context.Background()
	lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: controller.LeasePrefix + node}}
	err := e.c.Get(ctx, client.ObjectKeyFromObject(lease), lease)
	lease.Annotations = map[string]string{controller.AppliedAnnotation: hash}
	lease.Spec.HolderIdentity = &node
	lease.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
	if err != nil {
		err = e.c.Create(ctx, lease)
	} else {
		err = e.c.Update(ctx, lease)
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

func TestImageSourceLifecycle(t *testing.T) {
	e := start(t)
	reg := testenv.StartRegistry(t)

	// Published, sources reachable, but no node yet.
	e.create(&imagemeshv1alpha1.ImageSource{
		ObjectMeta: metav1.ObjectMeta{Name: "public"},
		Spec: imagemeshv1alpha1.ImageSourceSpec{
			Registries: []string{"a.test", "b.test"}, Upstream: &imagemeshv1alpha1.Upstream{Endpoint: reg.URL},
			Prefetch:     []string{"a.test/team/app:v1", "b.test/x@sha256:" + strings.Repeat("0", 64)},
			NodeSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"pool": "gpu"}},
		},
	})
	e.condition("public", imagemeshv1alpha1.ConditionSourcesReachable, controller.ReasonReachable)
	e.condition("public", imagemeshv1alpha1.ConditionReady, controller.ReasonNoNodes)
	doc, hash := e.published()
	if len(doc.Registries) != 2 || doc.Registries[0].Host != "a.test" || doc.Registries[0].Endpoint != reg.URL ||
		len(doc.Registries[0].Prefetch) != 1 || doc.Registries[0].NodeSelector == nil {
		t.Fatalf("published %+v", doc)
	}

	// Nodes join; the selected ones' agents apply the configuration.
	for _, n := range []struct{ name, pool string }{{"n1", "gpu"}, {"n2", "gpu"}, {"n3", "cpu"}} {
		e.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.name, Labels: map[string]string{"pool": n.pool}}})
	}
	e.agentApplied("n1", hash)
	e.agentApplied("n3", hash)
	// Both Leases reach the controller in their own time: wait for the status that counts both.
	e.eventually("1 of 2 selected nodes configured", func() error {
		is := e.imageSource("public")
		c := meta.FindStatusCondition(is.Status.Conditions, imagemeshv1alpha1.ConditionReady)
		if is.Status.NodesSelected != 2 || is.Status.NodesConfigured != 1 || c == nil || c.Reason != controller.ReasonApplying || !strings.Contains(c.Message, "1 of 2") {
			return fmt.Errorf("status %+v", is.Status)
		}
		return nil
	})
	e.agentApplied("n2", "an-old-hash")
	e.condition("public", imagemeshv1alpha1.ConditionReady, controller.ReasonApplying)
	e.agentApplied("n2", hash)
	e.condition("public", imagemeshv1alpha1.ConditionReady, controller.ReasonConfigured)

	// A second ImageSource claims a.test too: the first keeps it, the second says why it does not.
	time.Sleep(1100 * time.Millisecond) // creation timestamps have a resolution of a second
	e.create(&imagemeshv1alpha1.ImageSource{
		ObjectMeta: metav1.ObjectMeta{Name: "second"},
		Spec:       imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"a.test", "c.test"}, Upstream: &imagemeshv1alpha1.Upstream{Endpoint: reg.URL}},
	})
	c := e.condition("second", imagemeshv1alpha1.ConditionReady, controller.ReasonConflict)
	if !strings.Contains(c.Message, "a.test is configured by ImageSource public") {
		t.Fatalf("conflict message: %q", c.Message)
	}
	if got := e.imageSource("second").Status.Registries; len(got) != 1 || got[0] != "c.test" {
		t.Fatalf("second configures %v, want [c.test]", got)
	}
	if o := e.owner("a.test"); o != "public" {
		t.Fatalf("a.test published for %q, want public", o)
	}
	// The configuration changed: nodes must apply it again.
	e.condition("public", imagemeshv1alpha1.ConditionReady, controller.ReasonApplying)

	// The first goes away: the second gets a.test.
	if err := e.c.Delete(context.Background(), e.imageSource("public")); err != nil {
		t.Fatal(err)
	}
	e.eventually("a.test handed to second", func() error {
		if o := e.owner("a.test"); o != "second" {
			return errors.New("owner " + o)
		}
		return nil
	})
	e.condition("second", imagemeshv1alpha1.ConditionReady, controller.ReasonApplying)
	_, hash = e.published()
	for _, n := range []string{"n1", "n2", "n3"} {
		e.agentApplied(n, hash)
	}
	e.condition("second", imagemeshv1alpha1.ConditionReady, controller.ReasonConfigured)

	// An update is observed: its generation, and the unreachable endpoint it now names.
	is := e.imageSource("second")
	is.Spec.Upstream.Endpoint = "http://127.0.0.1:1"
	if err := e.c.Update(context.Background(), is); err != nil {
		t.Fatal(err)
	}
	c = e.condition("second", imagemeshv1alpha1.ConditionSourcesReachable, controller.ReasonUnreachable)
	if !strings.Contains(c.Message, "127.0.0.1:1") {
		t.Fatalf("unreachable message: %q", c.Message)
	}
}

func TestMissingSecret(t *testing.T) {
	e := start(t)
	reg := testenv.StartRegistry(t)
	e.create(&imagemeshv1alpha1.ImageSource{
		ObjectMeta: metav1.ObjectMeta{Name: "private"},
		Spec: imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"p.test"}, Upstream: &imagemeshv1alpha1.Upstream{
			Endpoint: reg.URL, CredentialsSecretRef: &corev1.LocalObjectReference{Name: "pull-creds"}}},
	})
	c := e.condition("private", imagemeshv1alpha1.ConditionSourcesReachable, controller.ReasonSecretNotFound)
	if !strings.Contains(c.Message, ns+"/pull-creds") {
		t.Fatalf("message %q does not name the Secret", c.Message)
	}
	e.condition("private", imagemeshv1alpha1.ConditionReady, controller.ReasonSecretNotFound)
	// The configuration is published all the same: the agents report their own credential errors.
	if o := e.owner("p.test"); o != "private" {
		t.Fatalf("p.test published for %q", o)
	}
	e.create(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "pull-creds"}, StringData: map[string]string{"username": "u", "password": "p"}})
	e.condition("private", imagemeshv1alpha1.ConditionSourcesReachable, controller.ReasonReachable)
	e.condition("private", imagemeshv1alpha1.ConditionReady, controller.ReasonNoNodes)
}

// The CRD accepts the samples and rejects invalid ImageSources with a message that says what is wrong.
func TestCRDValidation(t *testing.T) {
	e := start(t)
	ctx := context.Background()
	samples, err := os.ReadFile("../../config/samples/imagemesh_v1alpha1_imagesource.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(samples), 4096)
	n := 0
	for {
		var u unstructured.Unstructured
		if err := dec.Decode(&u.Object); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if err := e.c.Create(ctx, &u, client.DryRunAll); err != nil {
			t.Errorf("sample %s rejected: %v", u.GetName(), err)
		}
		n++
	}
	if n < 2 {
		t.Fatalf("%d samples", n)
	}
	for name, tc := range map[string]struct {
		spec imagemeshv1alpha1.ImageSourceSpec
		want string
	}{
		"no registries": {imagemeshv1alpha1.ImageSourceSpec{}, "spec.registries"},
		"bad host":      {imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"Not_A_Host"}}, "spec.registries[0]"},
		"bad endpoint":  {imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"a.test"}, Upstream: &imagemeshv1alpha1.Upstream{Endpoint: "ftp://x"}}, "spec.upstream.endpoint"},
		"storj without bucket": {imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"a.test"},
			Sources: []imagemeshv1alpha1.Source{{Type: imagemeshv1alpha1.SourceStorj}}}, "a Storj source needs storj"},
		"ipfs with storj": {imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"a.test"},
			Sources: []imagemeshv1alpha1.Source{{Type: imagemeshv1alpha1.SourceIPFS, IPFS: &imagemeshv1alpha1.IPFSSource{Root: "/ipfs/bafy", Endpoint: "http://kubo:5001"},
				Storj: &imagemeshv1alpha1.StorjSource{Bucket: "images", AccessSecretRef: corev1.LocalObjectReference{Name: "s"}}}}}, "and not the other"},
		"bad ipfs root": {imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"a.test"},
			Sources: []imagemeshv1alpha1.Source{{Type: imagemeshv1alpha1.SourceIPFS, IPFS: &imagemeshv1alpha1.IPFSSource{Root: "bafy", Endpoint: "http://kubo:5001"}}}}, "spec.sources[0].ipfs.root"},
		"unknown source type": {imagemeshv1alpha1.ImageSourceSpec{Registries: []string{"a.test"},
			Sources: []imagemeshv1alpha1.Source{{Type: "S3"}}}, "spec.sources[0].type"},
	} {
		err := e.c.Create(ctx, &imagemeshv1alpha1.ImageSource{ObjectMeta: metav1.ObjectMeta{Name: "invalid"}, Spec: tc.spec}, client.DryRunAll)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a rejection naming %q", name, err, tc.want)
		}
	}
}
