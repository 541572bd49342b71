"""The kvgate Kubernetes operator: CRDs `KVCache`, `EnginePool`, `KVGateway` and their reconciliation.

`kvgate operator` (`operators.cli`) runs kopf with the handlers of
`operators.handlers`; the CRDs are generated from `operators.schema` by
`operators.crds`. This package imports neither `router` nor `kvcache`: it
speaks to them only through the command lines and settings it renders.
"""
