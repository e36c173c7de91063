"""Running the data pipeline on a Ray cluster: the cluster definition (cluster.yaml) and job submission."""
