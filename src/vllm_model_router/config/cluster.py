"""Where the models' servers run: on this machine (the ``local`` backend) or on a Ray cluster (``ray``).

Declared here rather than in schema.py, which holds the rest of the file: the ``cluster`` section and a
model's ``resources`` (its placement constraints on the cluster's nodes). Only the declarations live here;
nothing in this module, or anywhere the ``local`` backend runs, imports Ray, which is an optional extra
(``pip install 'vllm-model-router[ray]'``). rules.py checks what spans sections: ``resources`` only with
the ``ray`` backend, which starts servers and so is not for endpoint mode, and the GPU memory it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import Field

from vllm_model_router.config.composites import ResourceName, Shape
from vllm_model_router.config.scalars import Number, OneOf, Text
from vllm_model_router.config.section import Env, Scope, Section

BACKENDS = ("local", "ray")
DEFAULT_NAMESPACE = "vllm-model-router"
RAY_UNIT = 0.0001  # Ray counts a resource in steps of this: a smaller amount is refused, or would be 0

CLUSTER = "Where the models' servers run: on this machine (local) or on a Ray cluster (ray)."


class Cluster(Section):
    """``cluster``: the backend that starts the models' servers. With ``local`` (the default) the router
    starts them as its own subprocesses and the other keys are unused; with ``ray`` they are started on
    the nodes of the Ray cluster at ``address``."""

    backend: Annotated[str, OneOf(BACKENDS, "must be local or ray")] = Field(
        "local", description="local: the router starts the servers on this machine (Ray is neither needed nor "
        "imported); ray: on the nodes of a Ray cluster (needs the ray extra).")
    address: Annotated[str, Text("expected a Ray cluster address like auto or ray://head:10001",
                                 test=lambda a: a and not any(c.isspace() for c in a),
                                 json={"type": "string", "pattern": r"^\S+$"}),
                       Env("RAY_ADDRESS")] = Field(
        "auto", description="The Ray cluster to join: ray://<head>:10001 (Ray Client), <head>:6379 (the GCS), "
        "or auto: the cluster running on this machine.")
    namespace: Annotated[str, Text("expected a non-empty namespace", test=str.strip)] = Field(
        DEFAULT_NAMESPACE, description="The Ray namespace the router's actors are named in.")
    gpu_memory_gb: Annotated[float | None, Number(0, positive=True)] = Field(
        None, description="Memory of each GPU of the cluster's nodes (Ray counts GPUs, not their memory): "
        "each GPU's budget (capacity.memory_gb where lower), and what a model's share of a GPU reserved from "
        "Ray is a fraction of. Required with backend ray, as is every started model's memory_gb.")

    @property
    def ray(self) -> bool:
        return self.backend == "ray"


Resources = Annotated[
    Mapping[Annotated[str, ResourceName()], Annotated[float, Number(RAY_UNIT, none=False)]],
    Shape("mapping", 'expected a mapping of Ray resource names to amounts, like {"accelerator_type:H100": 0.001}'),
    Scope.PROCESS]

RESOURCES = ("Ray resources its server needs on a node, e.g. {accelerator_type:H100: 0.001}: placement "
             "constraints, only with cluster.backend ray. Amounts are at least 0.0001 (Ray's unit).")
