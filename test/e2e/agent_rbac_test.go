package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/imagemesh/imagemesh/internal/kubeclient"
	"github.com/imagemesh/imagemesh/internal/testenv"
	"github.com/imagemesh/imagemesh/internal/testenv/kubeenv"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
)

// nodeNameExtra is where the API server puts the node of the pod a ServiceAccount token is bound to
// (k8s.io/apiserver serviceaccount.NodeNameKey).
const nodeNameExtra = "authentication.kubernetes.io/node-name"

// TestAgentRBAC installs the chart's RBAC and its agent Lease policy on a real API server and acts as
// the agents' ServiceAccount, through impersonation, with the user info a token bound to a pod on
// node-a carries: the agent's own client can do what the agent does (watch the mirror ConfigMap, read
// a Secret, its Node and DaemonSet, list the EndpointSlices, write its node's Lease), and no more: no
// other node's Lease, not the controller's leader-election Lease, no Lease at all without a node in
// the token, no Secret listed, no Secret of another namespace.
func TestAgentRBAC(t *testing.T) {
	helm := testenv.Tool(t, "helm")
	kube := kubeenv.Start(t)
	admin, err := client.New(kube.Config, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const ns, other, release = "imagemesh", "elsewhere", "im-imagemesh"
	for _, n := range []string{ns, other} {
		if err := admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, o := range render(t, helm, ns) {
		if err := admin.Patch(ctx, o, client.Apply, client.FieldOwner("helm-test"), client.ForceOwnership); err != nil {
			t.Fatalf("apply %s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	// What the agents find in the cluster: the mirror configuration, a registry's credentials, the
	// node, another node's Lease, the controller's leader-election Lease (cmd/controller
	// LeaderElectionID), and a Secret of another namespace.
	lease := func(name string) *coordinationv1.Lease {
		return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	}
	for _, o := range []client.Object{
		&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: release + "-mirrors", Namespace: ns}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "registry-credentials", Namespace: ns}, StringData: map[string]string{"username": "u", "password": "p"}},
		&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "not-imagemesh", Namespace: other}, StringData: map[string]string{"token": "t"}},
		&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}},
		lease(mirrorconfig.LeasePrefix + "node-b"),
		lease("imagemesh-controller"),
	} {
		if err := admin.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}

	agentUser := "system:serviceaccount:" + ns + ":" + release + "-agent"
	as := func(user string, extra map[string][]string) (*kubeclient.Client, *kubernetes.Clientset) {
		cfg := rest.CopyConfig(kube.Config)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Extra: extra}
		k, err := kubeclient.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return k, kubernetes.NewForConfigOrDie(cfg)
	}
	onNode := func(node string) map[string][]string { return map[string][]string{nodeNameExtra: {node}} }
	agent, agentCS := as(agentUser, onNode("node-a"))
	// update writes a Lease as the agent does (clustersync report): read, then replace.
	update := func(k *kubeclient.Client, name string) error {
		l, err := k.Lease(ctx, ns, name)
		if err != nil {
			return err
		}
		l.Spec.HolderIdentity = new("node-a")
		return k.UpdateLease(ctx, l)
	}
	// The API server authorizes from informers, and starts enforcing a new admission policy a moment
	// after it is created: wait until a Secret can be read, and until a known-denied write is denied.
	waitUntil(t, 30*time.Second, "the agent's Role in effect", func() bool {
		_, err := agent.Secret(ctx, ns, "registry-credentials")
		return err == nil
	})
	deniedByPolicy := func(err error) bool {
		return apierrors.IsForbidden(err) && strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+release+"-agent-leases'")
	}
	waitUntil(t, 30*time.Second, "the Lease policy in effect", func() bool {
		return deniedByPolicy(update(agent, mirrorconfig.LeasePrefix+"node-b"))
	})

	t.Run("own lease", func(t *testing.T) {
		own := mirrorconfig.LeasePrefix + "node-a"
		if _, err := agent.Lease(ctx, ns, own); !apierrors.IsNotFound(err) {
			t.Fatalf("get own Lease before it exists: %v, want not found", err)
		}
		if err := agent.CreateLease(ctx, lease(own)); err != nil {
			t.Fatalf("create own Lease: %v", err)
		}
		for range 2 {
			if err := update(agent, own); err != nil {
				t.Fatalf("update own Lease: %v", err)
			}
		}
		// The agent never deletes its Lease (the controller counts a stale one as an agent gone).
		if err := agentCS.CoordinationV1().Leases(ns).Delete(ctx, own, metav1.DeleteOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("delete own Lease: %v, want forbidden", err)
		}
	})

	t.Run("other leases", func(t *testing.T) {
		if err := agent.CreateLease(ctx, lease(mirrorconfig.LeasePrefix+"node-c")); !deniedByPolicy(err) {
			t.Errorf("create another node's Lease: %v, want denied by the policy", err)
		}
		if err := update(agent, mirrorconfig.LeasePrefix+"node-b"); !deniedByPolicy(err) {
			t.Errorf("update another node's Lease: %v, want denied by the policy", err)
		}
		if err := update(agent, "imagemesh-controller"); !deniedByPolicy(err) {
			t.Errorf("update the controller's leader-election Lease: %v, want denied by the policy", err)
		}
		if _, err := agentCS.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list Leases: %v, want forbidden", err)
		}
		// The agent on node-b writes node-b's Lease, and not node-a's.
		nodeB, _ := as(agentUser, onNode("node-b"))
		if err := update(nodeB, mirrorconfig.LeasePrefix+"node-b"); err != nil {
			t.Errorf("the agent on node-b updates its Lease: %v", err)
		}
		if err := update(nodeB, mirrorconfig.LeasePrefix+"node-a"); !deniedByPolicy(err) {
			t.Errorf("the agent on node-b updates node-a's Lease: %v, want denied by the policy", err)
		}
	})

	t.Run("token not bound to a node", func(t *testing.T) {
		for name, extra := range map[string]map[string][]string{
			"no node":    nil,
			"two nodes":  {nodeNameExtra: {"node-a", "node-b"}},
			"pod only":   {"authentication.kubernetes.io/pod-name": {"im-imagemesh-agent-x"}},
			"empty node": {nodeNameExtra: {""}},
		} {
			unbound, _ := as(agentUser, extra)
			if err := update(unbound, mirrorconfig.LeasePrefix+"node-a"); !deniedByPolicy(err) {
				t.Errorf("%s: update node-a's Lease: %v, want denied by the policy", name, err)
			}
			if err := unbound.CreateLease(ctx, lease(mirrorconfig.LeasePrefix+"node-d")); !deniedByPolicy(err) {
				t.Errorf("%s: create a Lease: %v, want denied by the policy", name, err)
			}
		}
	})

	t.Run("controller unaffected", func(t *testing.T) {
		controller, _ := as("system:serviceaccount:"+ns+":"+release+"-controller", nil)
		if err := update(controller, "imagemesh-controller"); err != nil {
			t.Errorf("the controller renews its leader-election Lease: %v", err)
		}
	})

	t.Run("reads", func(t *testing.T) {
		if _, err := agent.Node(ctx, "node-a"); err != nil {
			t.Errorf("get the node: %v", err)
		}
		if _, err := agent.DaemonSetMeta(ctx, ns, release+"-agent"); err != nil {
			t.Errorf("get the agents' DaemonSet: %v", err)
		}
		if _, err := agent.EndpointSlices(ctx, ns, "kubernetes.io/service-name="+release+"-agent"); err != nil {
			t.Errorf("list the agents' EndpointSlices: %v", err)
		}
		// The informer clustersync runs on the mirror ConfigMap: list and watch by name.
		informer := agent.ConfigMapInformer(ns, release+"-mirrors", time.Minute)
		ictx, stop := context.WithTimeout(ctx, 30*time.Second)
		defer stop()
		go informer.RunWithContext(ictx)
		if !cache.WaitForCacheSync(ictx.Done(), informer.HasSynced) {
			t.Errorf("the mirror ConfigMap's informer did not sync")
		} else if _, ok, _ := informer.GetStore().GetByKey(ns + "/" + release + "-mirrors"); !ok {
			t.Errorf("the mirror ConfigMap's informer has no ConfigMap")
		}
		if _, err := agentCS.CoreV1().ConfigMaps(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list every ConfigMap: %v, want forbidden", err)
		}
	})

	t.Run("secrets", func(t *testing.T) {
		if s, err := agent.Secret(ctx, ns, "registry-credentials"); err != nil || string(s.Data["username"]) != "u" {
			t.Errorf("get a Secret an ImageSource names: %v", err)
		}
		if _, err := agentCS.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list Secrets: %v, want forbidden", err)
		}
		if _, err := agentCS.CoreV1().Secrets(ns).Watch(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("watch Secrets: %v, want forbidden", err)
		}
		if _, err := agent.Secret(ctx, other, "not-imagemesh"); !apierrors.IsForbidden(err) {
			t.Errorf("get a Secret of another namespace: %v, want forbidden", err)
		}
	})
}
