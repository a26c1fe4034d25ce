// Package controller reconciles ImageSources into the mirror configuration every node agent applies.
package controller

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"storj.io/uplink"

	imagemeshv1alpha1 "github.com/imagemesh/imagemesh/api/v1alpha1"
	"github.com/imagemesh/imagemesh/pkg/mirrorconfig"
	"github.com/imagemesh/imagemesh/pkg/storjaccess"
)

// The contract with the node agents (see mirrorconfig): the controller publishes the configuration in
// a ConfigMap; each agent reports the hash it applied in a Lease of its own.
const (
	LeasePrefix       = mirrorconfig.LeasePrefix
	AppliedAnnotation = mirrorconfig.AppliedAnnotation
	LeaseStale        = mirrorconfig.LeaseStale
)

// Reasons of the conditions.
const (
	ReasonConfigured      = "Configured"
	ReasonApplying        = "Applying"
	ReasonNoNodes         = "NoNodesSelected"
	ReasonConflict        = "RegistryClaimed"
	ReasonSecretNotFound  = "SecretNotFound"
	ReasonUnreachable     = "Unreachable"
	ReasonReachable       = "Reachable"
	ReasonInvalidSelector = "InvalidNodeSelector"
	ReasonInvalidAccess   = "InvalidAccessGrant"
)

// NewScheme holds the types the controller reads and writes: Kubernetes' own and ImageSource.
func NewScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(s))
	utilruntime.Must(imagemeshv1alpha1.AddToScheme(s))
	return s
}

// ImageSourceReconciler publishes the mirror configuration of all ImageSources and keeps each one's
// status. Every reconcile computes the whole configuration: which ImageSource owns a registry depends
// on all of them.
type ImageSourceReconciler struct {
	client.Client
	// Namespace holds the referenced Secrets, the published ConfigMap and the agents' Leases.
	Namespace string
	// ConfigMapName is the ConfigMap the agents read. Default "imagemesh-mirrors".
	ConfigMapName string
	Recorder      record.EventRecorder
	// Probe checks that an endpoint of a kind (ProbeRegistry, ProbeIPFS) answers; nil checks nothing.
	Probe func(ctx context.Context, kind, endpoint string) error
	// StorjProbe checks that a Storj bucket exists and the access grant may read it; nil checks
	// nothing beyond the grant's format.
	StorjProbe func(ctx context.Context, access *uplink.Access, bucket string) error
	// Now is the clock (tests); default time.Now.
	Now func() time.Time
}

// +kubebuilder:rbac:groups=imagemesh.io,resources=imagesources,verbs=get;list;watch
// +kubebuilder:rbac:groups=imagemesh.io,resources=imagesources/status,verbs=get;update;patch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=events,verbs=create;patch
// +kubebuilder:rbac:groups="",namespace=imagemesh-system,resources=configmaps,verbs=get;list;watch;create;update
// +kubebuilder:rbac:groups="",namespace=imagemesh-system,resources=secrets,verbs=get;list;watch
// The agents' Leases are read; the controller's own (leader election) is written.
// +kubebuilder:rbac:groups=coordination.k8s.io,namespace=imagemesh-system,resources=leases,verbs=get;list;watch;create;update;patch

// Reconcile rebuilds the whole mirror configuration from every ImageSource, whichever one changed:
// the ConfigMap is one document, and each registry's entry merges all the sources that name it.
func (r *ImageSourceReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	logger := log.FromContext(ctx)
	var list imagemeshv1alpha1.ImageSourceList
	if err := r.List(ctx, &list); err != nil {
		return ctrl.Result{}, err
	}
	doc, claims := Build(list.Items)
	hash, err := r.publish(ctx, doc)
	if err != nil {
		return ctrl.Result{}, fmt.Errorf("publish mirror configuration: %w", err)
	}

	var is imagemeshv1alpha1.ImageSource
	if err := r.Get(ctx, req.NamespacedName, &is); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !is.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, nil
	}
	status := is.Status.DeepCopy()
	status.ObservedGeneration = is.Generation
	status.Registries = claims[is.Name].Owned
	gen := is.Generation

	reachable := r.checkSources(ctx, &is)
	reachable.ObservedGeneration = gen
	meta.SetStatusCondition(&status.Conditions, reachable)

	selected, configured, selErr := r.countNodes(ctx, &is, hash)
	status.NodesSelected, status.NodesConfigured = selected, configured

	ready := metav1.Condition{Type: imagemeshv1alpha1.ConditionReady, ObservedGeneration: gen}
	lost := claims[is.Name].Lost
	switch {
	case selErr != nil:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, ReasonInvalidSelector, selErr.Error()
	case len(lost) > 0:
		msgs := make([]string, 0, len(lost))
		for _, l := range lost {
			msgs = append(msgs, fmt.Sprintf("%s is configured by ImageSource %s, created first", l.Host, l.Owner))
		}
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, ReasonConflict, strings.Join(msgs, "; ")
	case reachable.Status != metav1.ConditionTrue && reachable.Reason == ReasonSecretNotFound:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, ReasonSecretNotFound, reachable.Message
	case selected == 0:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, ReasonNoNodes, "no node matches the node selector"
	case configured < selected:
		ready.Status, ready.Reason = metav1.ConditionFalse, ReasonApplying
		ready.Message = fmt.Sprintf("%d of %d nodes applied mirror configuration %s", configured, selected, hash)
	default:
		ready.Status, ready.Reason = metav1.ConditionTrue, ReasonConfigured
		ready.Message = fmt.Sprintf("%d nodes applied mirror configuration %s", configured, hash)
	}
	if old := meta.FindStatusCondition(is.Status.Conditions, ready.Type); old == nil || old.Reason != ready.Reason {
		kind := corev1.EventTypeNormal
		if ready.Status != metav1.ConditionTrue && ready.Reason != ReasonApplying {
			kind = corev1.EventTypeWarning
		}
		if r.Recorder != nil {
			r.Recorder.Event(&is, kind, ready.Reason, ready.Message)
		}
	}
	meta.SetStatusCondition(&status.Conditions, ready)

	if !equality.Semantic.DeepEqual(&is.Status, status) {
		is.Status = *status
		if err := r.Status().Update(ctx, &is); err != nil {
			return ctrl.Result{}, err
		}
		logger.V(1).Info("status updated", "ready", ready.Reason, "nodes", fmt.Sprintf("%d/%d", configured, selected))
	}
	// Sources are probed again now and then; node progress arrives through the Lease watch.
	return ctrl.Result{RequeueAfter: 5 * time.Minute}, nil
}

// Claims says, for one ImageSource, which of its registries it configures and which another one
// claimed first.
type Claims struct {
	Owned []string
	Lost  []Lost
}

// Lost is a registry claimed by an older ImageSource.
type Lost struct{ Host, Owner string }

// Build derives the mirror configuration from the ImageSources. A registry claimed by several belongs
// to the one created first (by name when created in the same second): a winner that does not depend
// on the order of events.
func Build(items []imagemeshv1alpha1.ImageSource) (mirrorconfig.Document, map[string]Claims) {
	sorted := slices.Clone(items)
	sort.Slice(sorted, func(i, j int) bool {
		a, b := sorted[i].CreationTimestamp, sorted[j].CreationTimestamp
		if !a.Equal(&b) {
			return a.Before(&b)
		}
		return sorted[i].Name < sorted[j].Name
	})
	owner := map[string]string{}
	claims := map[string]Claims{}
	var doc mirrorconfig.Document
	for _, is := range sorted {
		if !is.DeletionTimestamp.IsZero() {
			continue
		}
		c := claims[is.Name]
		for _, host := range is.Spec.Registries {
			if o, taken := owner[host]; taken {
				c.Lost = append(c.Lost, Lost{Host: host, Owner: o})
				continue
			}
			owner[host] = is.Name
			c.Owned = append(c.Owned, host)
			doc.Registries = append(doc.Registries, registry(&is, host))
		}
		claims[is.Name] = c
	}
	sort.Slice(doc.Registries, func(i, j int) bool { return doc.Registries[i].Host < doc.Registries[j].Host })
	return doc, claims
}

func registry(is *imagemeshv1alpha1.ImageSource, host string) mirrorconfig.Registry {
	reg := mirrorconfig.Registry{Host: host, ImageSource: is.Name, PeersResolveTags: is.Spec.PeersResolveTags, NodeSelector: is.Spec.NodeSelector}
	if u := is.Spec.Upstream; u != nil {
		reg.Endpoint = u.Endpoint
		if u.CredentialsSecretRef != nil {
			reg.CredentialsSecret = u.CredentialsSecretRef.Name
		}
	}
	for _, s := range is.Spec.Sources {
		src := mirrorconfig.Source{Type: string(s.Type)}
		if s.Storj != nil {
			src.Bucket, src.Prefix, src.AccessSecret = s.Storj.Bucket, s.Storj.Prefix, s.Storj.AccessSecretRef.Name
		}
		if s.IPFS != nil {
			src.Root, src.Endpoint = s.IPFS.Root, s.IPFS.Endpoint
		}
		reg.Sources = append(reg.Sources, src)
	}
	for _, img := range is.Spec.Prefetch {
		if strings.HasPrefix(img, host+"/") {
			reg.Prefetch = append(reg.Prefetch, img)
		}
	}
	return reg
}

// publish writes the configuration into the ConfigMap and returns its hash.
func (r *ImageSourceReconciler) publish(ctx context.Context, doc mirrorconfig.Document) (string, error) {
	body, err := doc.Marshal()
	if err != nil {
		return "", err
	}
	hash := doc.Hash()
	name := r.configMapName()
	var cm corev1.ConfigMap
	err = r.Get(ctx, types.NamespacedName{Namespace: r.Namespace, Name: name}, &cm)
	if apierrors.IsNotFound(err) {
		cm = corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: r.Namespace, Name: name, Labels: map[string]string{"app.kubernetes.io/managed-by": "imagemesh-controller"},
				Annotations: map[string]string{AppliedAnnotation: hash}},
			Data: map[string]string{mirrorconfig.ConfigMapKey: string(body)},
		}
		return hash, r.Create(ctx, &cm)
	}
	if err != nil {
		return "", err
	}
	if cm.Data[mirrorconfig.ConfigMapKey] == string(body) && cm.Annotations[AppliedAnnotation] == hash {
		return hash, nil
	}
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	if cm.Annotations == nil {
		cm.Annotations = map[string]string{}
	}
	cm.Data[mirrorconfig.ConfigMapKey] = string(body)
	cm.Annotations[AppliedAnnotation] = hash
	return hash, r.Update(ctx, &cm)
}

func (r *ImageSourceReconciler) configMapName() string {
	if r.ConfigMapName == "" {
		return "imagemesh-mirrors"
	}
	return r.ConfigMapName
}

// checkSources reports whether the referenced Secrets exist and the upstream answers.
func (r *ImageSourceReconciler) checkSources(ctx context.Context, is *imagemeshv1alpha1.ImageSource) metav1.Condition {
	cond := metav1.Condition{Type: imagemeshv1alpha1.ConditionSourcesReachable, Status: metav1.ConditionTrue, Reason: ReasonReachable, Message: "secrets found, sources answered"}
	var secrets []string
	if u := is.Spec.Upstream; u != nil && u.CredentialsSecretRef != nil {
		secrets = append(secrets, u.CredentialsSecretRef.Name)
	}
	for _, s := range is.Spec.Sources {
		if s.Storj != nil {
			secrets = append(secrets, s.Storj.AccessSecretRef.Name)
		}
	}
	var missing []string
	for _, name := range secrets {
		var sec corev1.Secret
		if err := r.Get(ctx, types.NamespacedName{Namespace: r.Namespace, Name: name}, &sec); err != nil {
			missing = append(missing, fmt.Sprintf("%s/%s", r.Namespace, name))
		}
	}
	if len(missing) > 0 {
		cond.Status, cond.Reason = metav1.ConditionFalse, ReasonSecretNotFound
		cond.Message = "Secret not found: " + strings.Join(missing, ", ")
		return cond
	}
	// Storj access grants: the format here, the bucket and the grant's rights by StorjProbe. Messages
	// name the Secret, never its content.
	var storjErrs []error
	reason := ReasonUnreachable
	for _, s := range is.Spec.Sources {
		if s.Storj == nil {
			continue
		}
		ref := fmt.Sprintf("%s/%s", r.Namespace, s.Storj.AccessSecretRef.Name)
		var sec corev1.Secret
		if err := r.Get(ctx, types.NamespacedName{Namespace: r.Namespace, Name: s.Storj.AccessSecretRef.Name}, &sec); err != nil {
			storjErrs = append(storjErrs, fmt.Errorf("access Secret %s: %w", ref, err))
			continue
		}
		access, err := storjaccess.Parse(string(sec.Data[mirrorconfig.StorjAccessKey]))
		if err != nil {
			reason = ReasonInvalidAccess
			storjErrs = append(storjErrs, fmt.Errorf("access Secret %s, key %q: %w", ref, mirrorconfig.StorjAccessKey, err))
			continue
		}
		if r.StorjProbe != nil {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if err := r.StorjProbe(pctx, access, s.Storj.Bucket); err != nil {
				storjErrs = append(storjErrs, fmt.Errorf("bucket %s on Storj (grant in Secret %s): %w", s.Storj.Bucket, ref, err))
			}
			cancel()
		}
	}
	if len(storjErrs) > 0 {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, reason, errors.Join(storjErrs...).Error()
		return cond
	}
	if r.Probe != nil {
		type target struct{ kind, endpoint string }
		var targets []target
		if u := is.Spec.Upstream; u != nil {
			targets = append(targets, target{ProbeRegistry, u.Endpoint})
		} else if len(is.Spec.Sources) == 0 {
			// Without an upstream, registries that exist only in Storj or IPFS are not probed.
			for _, h := range is.Spec.Registries {
				targets = append(targets, target{ProbeRegistry, "https://" + h})
			}
		}
		for _, s := range is.Spec.Sources {
			if s.IPFS != nil {
				targets = append(targets, target{ProbeIPFS, s.IPFS.Endpoint})
			}
		}
		var errs []error
		for _, t := range targets {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := r.Probe(pctx, t.kind, t.endpoint); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", t.endpoint, err))
			}
			cancel()
		}
		if len(errs) > 0 {
			cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, ReasonUnreachable, errors.Join(errs...).Error()
		}
	}
	return cond
}

// countNodes counts the nodes the selector matches and, of those, the ones whose agent applied hash.
func (r *ImageSourceReconciler) countNodes(ctx context.Context, is *imagemeshv1alpha1.ImageSource, hash string) (selected, configured int32, err error) {
	sel := labels.Everything()
	if is.Spec.NodeSelector != nil {
		if sel, err = metav1.LabelSelectorAsSelector(is.Spec.NodeSelector); err != nil {
			return 0, 0, fmt.Errorf("node selector: %w", err)
		}
	}
	var nodes corev1.NodeList
	if err := r.List(ctx, &nodes, client.MatchingLabelsSelector{Selector: sel}); err != nil {
		return 0, 0, err
	}
	var leases coordinationv1.LeaseList
	if err := r.List(ctx, &leases, client.InNamespace(r.Namespace)); err != nil {
		return 0, 0, err
	}
	applied := map[string]bool{}
	now := r.now()
	for _, l := range leases.Items {
		node, ok := strings.CutPrefix(l.Name, LeasePrefix)
		if !ok || l.Annotations[AppliedAnnotation] != hash || l.Spec.RenewTime == nil || now.Sub(l.Spec.RenewTime.Time) > LeaseStale {
			continue
		}
		applied[node] = true
	}
	for _, n := range nodes.Items {
		selected++
		if applied[n.Name] {
			configured++
		}
	}
	return selected, configured, nil
}

func (r *ImageSourceReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// Kinds of endpoints a Probe checks.
const (
	ProbeRegistry = "registry"
	ProbeIPFS     = "ipfs"
)

// UplinkProbe checks a Storj bucket with storj.io/uplink: the satellite answers, the bucket exists, and
// the grant may look at it.
func UplinkProbe(ctx context.Context, access *uplink.Access, bucket string) error {
	project, err := (uplink.Config{UserAgent: "imagemesh-controller"}).OpenProject(ctx, access)
	if err != nil {
		return fmt.Errorf("open project on %s: %w", access.SatelliteAddress(), err)
	}
	defer func() { _ = project.Close() }() // only looked
	_, err = project.StatBucket(ctx, bucket)
	switch {
	case errors.Is(err, uplink.ErrBucketNotFound):
		return errors.New("the bucket does not exist")
	case errors.Is(err, uplink.ErrPermissionDenied):
		return errors.New("the access grant was refused (revoked, expired, or not for this bucket)")
	case err != nil:
		return fmt.Errorf("satellite %s: %w", access.SatelliteAddress(), err)
	}
	return nil
}

// HTTPProbe checks endpoints over HTTP: a registry's /v2/ answers 200 or 401; a kubo RPC API answers
// POST /api/v0/version with 200. A failed connection or any other answer is unreachable.
func HTTPProbe(c *http.Client) func(ctx context.Context, kind, endpoint string) error {
	return func(ctx context.Context, kind, endpoint string) error {
		method, url, ok := http.MethodGet, strings.TrimSuffix(endpoint, "/")+"/v2/", []int{http.StatusOK, http.StatusUnauthorized}
		if kind == ProbeIPFS {
			method, url, ok = http.MethodPost, strings.TrimSuffix(endpoint, "/")+"/api/v0/version", []int{http.StatusOK}
		}
		req, err := http.NewRequestWithContext(ctx, method, url, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		_ = resp.Body.Close() // only the status matters
		if !slices.Contains(ok, resp.StatusCode) {
			return fmt.Errorf("%s %s: HTTP %d", method, url, resp.StatusCode)
		}
		return nil
	}
}

// SetupWithManager watches ImageSources, and the Secrets, Nodes and agent Leases their status depends
// on; any change reconciles every ImageSource, since claims and the configuration are global.
func (r *ImageSourceReconciler) SetupWithManager(mgr ctrl.Manager) error {
	all := handler.EnqueueRequestsFromMapFunc(func(ctx context.Context, _ client.Object) []reconcile.Request {
		var list imagemeshv1alpha1.ImageSourceList
		if err := r.List(ctx, &list); err != nil {
			return nil
		}
		reqs := make([]reconcile.Request, 0, len(list.Items))
		for _, is := range list.Items {
			reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Name: is.Name}})
		}
		return reqs
	})
	inNamespace := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetNamespace() == r.Namespace })
	return ctrl.NewControllerManagedBy(mgr).
		Named("imagesource").
		For(&imagemeshv1alpha1.ImageSource{}).
		// Creating, changing or deleting one ImageSource can change the claims of the others.
		Watches(&imagemeshv1alpha1.ImageSource{}, all, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		Watches(&corev1.Secret{}, all, builder.WithPredicates(inNamespace)).
		Watches(&coordinationv1.Lease{}, all, builder.WithPredicates(inNamespace, predicate.NewPredicateFuncs(func(o client.Object) bool {
			return strings.HasPrefix(o.GetName(), LeasePrefix)
		}))).
		Watches(&corev1.Node{}, all, builder.WithPredicates(predicate.LabelChangedPredicate{})).
		Complete(r)
}
