"""Deploying rillet beyond one process. `rillet.deploy.ray`: Ray Serve (needs `rillet[ray]`).

`routing` (the prefix-affinity policy) and `tunnel` (HTTP to a replica's app) import no Ray.
"""
