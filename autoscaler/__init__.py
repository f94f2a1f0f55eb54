"""The autoscaler: Shoal's global scheduler. Each tick it gathers a snapshot
of the cluster, asks pure policies for decisions (scale out, drain, stop,
migrate), executes them through a provider and the instances' migration
endpoints, and records every decision as an event."""
