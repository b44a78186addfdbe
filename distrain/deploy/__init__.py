"""Deploying a study: Kubernetes manifests rendered from its config (`distrain k8s render`)."""
