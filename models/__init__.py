"""Model builders, losses and metrics shared by the coordinator and the sites.

Nothing here imports Flower or MLflow, so a hospital node can import it
without pulling in the coordinator.
"""
