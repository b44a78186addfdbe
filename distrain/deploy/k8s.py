"""`distrain k8s render`: the Kubernetes manifests of a study, generated from its config and plan.

A kustomize tree: `base/` (the shared run volume, MLflow on PostgreSQL) and `overlays/<experiment>[-mode]/`
(the config as a ConfigMap, the worker Job or JobSet, the images set once). `kubectl apply -k
overlays/<name>` deploys it. Three worker modes:

- indexed: an Indexed Job, pod i trains the plan's jobs i, i+N, ... (`DISTRAIN_NUM_SHARDS` = completions);
  a job that failed for good fails its index only.
- queue: N identical pods claim the next pending job from the ledger until none is left.
- multinode: a JobSet; each worker is one DDP group over `nodes_per_worker` pods that meet at pod 0 through
  the JobSet's headless Service.

Every pod passes the "restricted" Pod Security level; exit codes keep their meaning through
`podFailurePolicy` (75 preempted: Ignore, 2 bad input / 4 no GPU: FailJob, 3 failed for good: FailIndex).
Torch-free: it reads the config and counts the plan's jobs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distrain import __version__
from distrain.config import Config, config_from_dict, dump_yaml
from distrain.errors import EXIT_BAD_INPUT, EXIT_FAILED_FOR_GOOD, EXIT_NO_GPU, EXIT_PREEMPTED, BadInput
from distrain.fsutil import atomic_write_text
from distrain.orchestration.local import GRACE_PERIOD_S
from distrain.study.plan import expand_plan

MIN_KUBERNETES = "1.31"  # podFailurePolicy GA (1.31), backoffLimitPerIndex on by default (beta 1.29, GA 1.33)
RUNS_MOUNT = "/runs"
CONFIG_MOUNT = "/etc/distrain"
MLFLOW = "distrain-mlflow"  # the Service workers log to
MLFLOW_PORT = 5000
POSTGRES = "distrain-postgres"
DB_SECRET = "distrain-mlflow-db"  # key `password` (in-cluster PostgreSQL) or `uri` (--external-db)
POSTGRES_IMAGE = "postgres:16.6-bookworm"
WORKER_UID = 1000  # the images' user; the run volume must be writable by it (or by group 1000)
POSTGRES_UID = 999  # the postgres image's user
MODES = ("indexed", "queue", "multinode")


@dataclass(frozen=True)
class RenderOptions:
    """What `distrain k8s render` was asked for (its command-line flags)."""

    workers: int
    gpus_per_worker: int = 0
    mode: str = "indexed"
    nodes_per_worker: int = 2  # multinode only
    image: str = f"distrain:{__version__}"
    mlflow_image: str = f"distrain-mlflow:{__version__}"
    namespace: str = ""
    storage_class: str = ""  # the run volume's class; it must offer ReadWriteMany
    runs_storage: str = "200Gi"
    cpu: str = "4"
    memory: str = ""  # empty: sized by `pod_memory` from the GPUs and the shm
    shm: str = ""  # empty: sized by `pod_shm`
    rdma: str = ""  # an RDMA device resource (e.g. rdma/ib) for multi-node NCCL; adds the IPC_LOCK capability
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    priority_class: str = ""
    queue: str = ""  # Kueue LocalQueue
    deadline_s: int = 7 * 24 * 3600
    ttl_s: int = 3 * 24 * 3600
    retries_per_index: int = 3
    data_root: str = ""  # in the pods; default /runs/data/<the config's data.root folder name>
    external_db: bool = False  # the MLflow backend store URL from Secret distrain-mlflow-db, key uri
    mlflow_artifacts: str = ""  # default: a volume of the MLflow pod; or an s3:// URL

    def check(self) -> None:
        if self.mode not in MODES:
            raise BadInput(f"--mode {self.mode}: expected one of {', '.join(MODES)}")
        if self.workers < 1 or self.gpus_per_worker < 0 or self.nodes_per_worker < 1:
            raise BadInput("--workers >= 1, --gpus-per-worker >= 0 and --nodes-per-worker >= 1")
        for ref in (self.image, self.mlflow_image):
            image_ref(ref)
        if self.memory and gib(self.memory) < gib(pod_shm(self)) + 4:
            raise BadInput(f"--memory {self.memory}: the /dev/shm volume ({pod_shm(self)}) counts against the pod's "
                           f"memory; give at least 4Gi more than it (or leave --memory out to size it)")  # fmt: skip


GIB_PER_GPU = 12
"""Host memory per GPU rank: the trainer process, its DataLoader workers' decoded batches, and a checkpoint that
rank 0 holds twice while it writes it."""
SHM_GIB_PER_GPU = 4
"""/dev/shm per GPU rank: DataLoader workers hand their batches over through it (prefetch x workers x batch)."""


def pod_shm(opts: RenderOptions) -> str:
    """The worker pod's /dev/shm size: --shm, else 4Gi per GPU (2Gi for a CPU pod)."""
    return opts.shm or f"{max(2, SHM_GIB_PER_GPU * opts.gpus_per_worker)}Gi"


def pod_memory(opts: RenderOptions) -> str:
    """The worker pod's memory request and limit: --memory, else 8Gi + 12Gi per GPU + the shm (a memory-backed
    emptyDir counts against the container's limit, so a full /dev/shm would otherwise get the pod OOM-killed)."""
    return opts.memory or f"{8 + GIB_PER_GPU * opts.gpus_per_worker + math.ceil(gib(pod_shm(opts)))}Gi"


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")


def gib(quantity: str) -> float:
    """A Kubernetes memory quantity in GiB ("16Gi", "512Mi", "20G"); BadInput for anything else."""
    match = _QUANTITY.match(quantity)
    if not match:
        raise BadInput(f"memory quantity {quantity!r}: expected e.g. 16Gi or 512Mi")
    scale = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(match.group(1)) * scale.get(match.group(2), 1) / 2**30


def dns_name(text: str) -> str:
    """`text` as a DNS-1123 label part: lower case, [a-z0-9-], at most 40 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-")
    if not name:
        raise BadInput(f"{text!r}: no letters or digits to name Kubernetes objects after")
    return name


def image_ref(ref: str) -> dict:
    """A kustomize `images:` entry's target for `repo[:tag]` or `repo@sha256:<64 hex>`."""
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise BadInput(f"image {ref}: a digest is sha256:<64 hex digits>")
        return {"newName": name, "digest": digest}
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    if not tag or tag == "latest":
        raise BadInput(f"image {ref}: give a version tag or a digest (not latest): pods must all run one image")
    return {"newName": name, "newTag": tag}


def pod_config(cfg: Config, opts: RenderOptions) -> Config:
    """The config as the pods see it: run root on the shared volume, data under it, MLflow's Service."""
    raw = cfg.to_dict()
    raw["run_root"] = RUNS_MOUNT
    raw["data"]["root"] = opts.data_root or f"{RUNS_MOUNT}/data/{Path(cfg.data.root).name}"
    raw["tracking"]["uri"] = f"http://{MLFLOW}:{MLFLOW_PORT}"
    return config_from_dict(raw, check_models=False)


def render(cfg: Config, opts: RenderOptions, out: Path) -> list[Path]:
    """Write the kustomize tree under `out`; returns the files written."""
    written = []
    for rel, text in manifests(cfg, opts).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        written.append(path)
    return written


def manifests(cfg: Config, opts: RenderOptions) -> dict[str, str]:
    """{relative path: file text} of the whole tree."""
    opts.check()
    name = dns_name(cfg.experiment)
    overlay = f"overlays/{name}" + ("" if opts.mode == "indexed" else f"-{opts.mode}")
    base_files = {"runs-pvc.yaml": [runs_pvc(opts)], "mlflow.yaml": mlflow_objects(opts)}
    if not opts.external_db:
        base_files["postgres.yaml"] = postgres_objects()
    base_kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                          **({"namespace": opts.namespace} if opts.namespace else {}),
                          "labels": [{"pairs": {"app.kubernetes.io/part-of": "distrain"}}],
                          "resources": list(base_files)}  # fmt: skip
    overlay_kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../../base", "workers.yaml"],
        "configMapGenerator": [{"name": f"distrain-{name}-config", "files": ["config.yaml"]}],
        "generatorOptions": {"disableNameSuffixHash": True},  # the JobSet's reference is not rewritten by kustomize
        "images": [{"name": "distrain", **image_ref(opts.image)}, {"name": MLFLOW, **image_ref(opts.mlflow_image)}],
    }
    files = {f"base/{f}": _yaml(docs) for f, docs in base_files.items()}
    files["base/kustomization.yaml"] = _yaml([base_kustomization])
    files[f"{overlay}/kustomization.yaml"] = _yaml([overlay_kustomization])
    files[f"{overlay}/config.yaml"] = dump_yaml(pod_config(cfg, opts))
    files[f"{overlay}/workers.yaml"] = _yaml([workers(cfg, opts, name)])
    return files


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a shared dict (labels) written out twice, not as &id001 / *id001
        return True


def _yaml(docs: list[dict]) -> str:
    header = "# Rendered by `distrain k8s render`; edit the config or the render flags, not this file.\n"
    return header + "---\n".join(yaml.dump(d, Dumper=_NoAliases, sort_keys=False, width=120) for d in docs)


def hardened(pod: dict, uid: int = WORKER_UID) -> dict:
    """`pod` (a pod spec) made to pass the "restricted" Pod Security level: non-root, no privilege escalation,
    every capability dropped, the runtime's seccomp profile, and no service-account token."""
    pod = {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        **pod,
    }  # fmt: skip
    for c in pod["containers"]:
        c["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True}  # fmt: skip
    return pod


def runs_pvc(opts: RenderOptions) -> dict:
    spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": opts.runs_storage}}}
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "distrain-runs"}, "spec": spec}


def _service(name: str, port: int, headless: bool = False) -> dict:
    spec = {"selector": {"app.kubernetes.io/name": name}, "ports": [{"name": "main", "port": port, "targetPort": port}]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def allowed_hosts() -> str:
    """The Host headers MLflow accepts: its Service's names (any namespace form and port) and port-forwards."""
    return ",".join([MLFLOW, f"{MLFLOW}:*", f"{MLFLOW}.*", "localhost:*", "127.0.0.1:*"])


def mlflow_objects(opts: RenderOptions) -> list[dict]:
    """MLflow's tracking server (its own small image, not the training image) on PostgreSQL, with a readiness
    probe that sends the Service's Host header, so a server refusing it (403) is never ready."""
    db = (f"postgresql+psycopg://mlflow:$(DB_PASSWORD)@{POSTGRES}:5432/mlflow" if not opts.external_db
          else "$(DB_URI)")  # fmt: skip
    secret_key = "uri" if opts.external_db else "password"
    artifacts = opts.mlflow_artifacts or "/mlflow/artifacts"
    probe_path = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    container = {
        "name": "mlflow",
        "image": MLFLOW,
        "command": ["mlflow", "server"],
        "args": ["--host", "0.0.0.0", "--port", str(MLFLOW_PORT), "--workers", "2", "--backend-store-uri", db,
                 "--artifacts-destination", artifacts, "--serve-artifacts", "--allowed-hosts", allowed_hosts()],
        "env": [{"name": "DB_URI" if opts.external_db else "DB_PASSWORD",
                 "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": secret_key}}},
                {"name": "HOME", "value": "/tmp"}],
        "envFrom": [{"secretRef": {"name": "distrain-mlflow-s3", "optional": True}}],  # AWS_* for s3:// artifacts
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "readinessProbe": {"httpGet": {"path": probe_path, "port": MLFLOW_PORT,
                                       "httpHeaders": [{"name": "Host", "value": f"{MLFLOW}:{MLFLOW_PORT}"}]},
                           "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": MLFLOW_PORT}, "periodSeconds": 30,
                          "failureThreshold": 5},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }  # fmt: skip
    volumes = [{"name": "tmp", "emptyDir": {}}]
    objects = []
    if not opts.mlflow_artifacts:
        container["volumeMounts"].append({"name": "artifacts", "mountPath": "/mlflow"})
        volumes.append({"name": "artifacts", "persistentVolumeClaim": {"claimName": "distrain-mlflow-artifacts"}})
        spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}}
        objects.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": "distrain-mlflow-artifacts"}, "spec": spec})  # fmt: skip
    pod = hardened({"containers": [container], "volumes": volumes})
    labels = {"app.kubernetes.io/name": MLFLOW}
    objects.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": MLFLOW},
                    "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                             "template": {"metadata": {"labels": labels}, "spec": pod}}})  # fmt: skip
    return objects + [_service(MLFLOW, MLFLOW_PORT)]


def postgres_objects() -> list[dict]:
    """PostgreSQL for MLflow's backend store: a StatefulSet with its own volume, password from the Secret."""
    container = {
        "name": "postgres",
        "image": POSTGRES_IMAGE,
        "env": [{"name": "POSTGRES_USER", "value": "mlflow"}, {"name": "POSTGRES_DB", "value": "mlflow"},
                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "password"}}},
                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "mlflow", "-d", "mlflow", "-h", "127.0.0.1"]},
                           "periodSeconds": 10},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                         {"name": "run", "mountPath": "/var/run/postgresql"}],
    }  # fmt: skip
    labels = {"app.kubernetes.io/name": POSTGRES}
    pod = hardened({"containers": [container], "volumes": [{"name": "run", "emptyDir": {}}]}, uid=POSTGRES_UID)
    claim = {"metadata": {"name": "data"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}}  # fmt: skip
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": POSTGRES},
                   "spec": {"serviceName": POSTGRES, "replicas": 1, "selector": {"matchLabels": labels},
                            "template": {"metadata": {"labels": labels}, "spec": pod},
                            "volumeClaimTemplates": [claim]}}  # fmt: skip
    return [statefulset, _service(POSTGRES, 5432)]


def failure_rules(mode: str) -> list[dict]:
    """podFailurePolicy rules: what each distrain exit code means to the Job controller."""
    failed_for_good = "FailIndex" if mode == "indexed" else "FailJob"

    def on_codes(action: str, codes: list[int]) -> dict:
        return {"action": action, "onExitCodes": {"containerName": "worker", "operator": "In", "values": codes}}

    return [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},  # eviction
        on_codes("Ignore", [EXIT_PREEMPTED]),  # SIGTERM, state saved: the next pod resumes it
        on_codes("FailJob", [EXIT_BAD_INPUT, EXIT_NO_GPU]),  # retrying cannot help
        on_codes(failed_for_good, [EXIT_FAILED_FOR_GOOD]),  # retries used up: stop this index (or the Job)
    ]


def worker_pod(cfg: Config, opts: RenderOptions, name: str) -> dict:
    """The worker pod spec: `distrain schedule` with the ConfigMap's config on the shared run volume."""
    gpus = opts.gpus_per_worker
    args = ["--workers", "1", *(["--gpus-per-worker", str(gpus)] if gpus else ["--procs-per-worker", "1"]),
            "--config", f"{CONFIG_MOUNT}/config.yaml"]  # fmt: skip
    env = []  # `distrain schedule` names the worker after the pod (or, over several nodes, after pod 0)
    if opts.mode == "multinode":
        leader = f"distrain-{name}-node-$(JOB_INDEX)-0.distrain-{name}"  # pod 0 of this worker's Job
        args += ["--num-machines", str(opts.nodes_per_worker), "--main-process-ip", leader]
        index = "metadata.annotations['jobset.sigs.k8s.io/job-index']"  # which worker (replicated Job) this is
        env = [{"name": "JOB_INDEX", "valueFrom": {"fieldRef": {"fieldPath": index}}}]
    memory = pod_memory(opts)
    limits = {
        "memory": memory,
        **({"nvidia.com/gpu": str(gpus)} if gpus else {}),
        **({opts.rdma: "1"} if opts.rdma else {}),
    }
    container = {
        "name": "worker",
        "image": "distrain",
        "imagePullPolicy": "IfNotPresent",
        "command": ["distrain", "schedule"],
        "args": args,
        "env": env + (NCCL_ENV if gpus else []),
        "resources": {"requests": {"cpu": opts.cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "runs", "mountPath": RUNS_MOUNT},
                         {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }  # fmt: skip
    volumes = [{"name": "runs", "persistentVolumeClaim": {"claimName": "distrain-runs"}},
               {"name": "config", "configMap": {"name": f"distrain-{name}-config"}},
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod_shm(opts)}}]  # fmt: skip
    pod = {"restartPolicy": "Never", "terminationGracePeriodSeconds": GRACE_PERIOD_S, "containers": [container],
           "volumes": volumes}  # fmt: skip
    tolerations = opts.tolerations or (
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpus else []
    )
    extra = {"nodeSelector": opts.node_selector, "tolerations": tolerations, "priorityClassName": opts.priority_class,
             "affinity": spread_over_nodes(name) if gpus else {}}  # fmt: skip
    pod = hardened({**pod, **{k: v for k, v in extra.items() if v}})
    if opts.rdma:  # registering RDMA memory needs IPC_LOCK: such a pod no longer meets the restricted level
        pod["containers"][0]["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]
    return pod


NCCL_ENV = [
    {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},  # a lost rank aborts the group instead of hanging it
    {"name": "NCCL_DEBUG", "value": "WARN"},  # NCCL's reasons in the pod log when a collective fails
]


def spread_over_nodes(name: str) -> dict:
    """Prefer one node per worker pod of the experiment: the ranks of a multi-node group on one node would share
    its NICs and PCIe, and one node's loss would take several workers with it."""
    term = {"labelSelector": {"matchLabels": {"app.kubernetes.io/name": "distrain-worker",
                                              "distrain.dev/experiment": name}},
            "topologyKey": "kubernetes.io/hostname"}  # fmt: skip
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": term}]}}  # fmt: skip


def workers(cfg: Config, opts: RenderOptions, name: str) -> dict:
    """The worker Job (indexed, queue) or JobSet (multinode), sized by the plan."""
    jobs = len(expand_plan(cfg))
    count = min(opts.workers, jobs)  # more pods than jobs would only wait
    labels = {"app.kubernetes.io/name": "distrain-worker", "distrain.dev/experiment": name,
              **({"kueue.x-k8s.io/queue-name": opts.queue} if opts.queue else {})}  # fmt: skip
    pod = worker_pod(cfg, opts, name)
    spec = {"activeDeadlineSeconds": opts.deadline_s, "ttlSecondsAfterFinished": opts.ttl_s,
            "podFailurePolicy": {"rules": failure_rules(opts.mode)}}  # fmt: skip
    if opts.mode == "indexed":
        pod["containers"][0]["env"].append({"name": "DISTRAIN_NUM_SHARDS", "value": str(count)})
        spec = {"completionMode": "Indexed", "completions": count, "parallelism": count,
                "backoffLimitPerIndex": opts.retries_per_index, **spec}  # fmt: skip
    elif opts.mode == "queue":
        spec = {"parallelism": count, "backoffLimit": opts.retries_per_index * count, **spec}
    else:
        return _jobset(opts, name, labels, pod, count)
    spec["template"] = {"metadata": {"labels": labels}, "spec": pod}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"distrain-{name}", "labels": labels},
            "spec": spec}  # fmt: skip


def _jobset(opts: RenderOptions, name: str, labels: dict, pod: dict, count: int) -> dict:
    """`count` workers, each an Indexed Job of `nodes_per_worker` pods forming one DDP group."""
    n = opts.nodes_per_worker
    job = {"completionMode": "Indexed", "completions": n, "parallelism": n, "backoffLimit": 0,
           "activeDeadlineSeconds": opts.deadline_s,
           "podFailurePolicy": {"rules": failure_rules("multinode")},
           "template": {"metadata": {"labels": labels}, "spec": pod}}  # fmt: skip
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": f"distrain-{name}", "labels": labels},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": f"distrain-{name}"},
            "ttlSecondsAfterFinished": opts.ttl_s,
            # a lost node breaks the whole DDP group: restart the set (workers resume from their checkpoints),
            # but not when a worker said retrying cannot help (its Job failed by its podFailurePolicy)
            "failurePolicy": {"maxRestarts": opts.retries_per_index,
                              "rules": [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "replicatedJobs": [{"name": "node", "replicas": count, "template": {"spec": job}}],
        },
    }  # fmt: skip
