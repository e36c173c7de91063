"""Running the data pipeline on a Ray cluster: the cluster definition (cluster.yaml), job submission, and a
cluster of several nodes on one machine for trying multi-node runs (local_cluster)."""
