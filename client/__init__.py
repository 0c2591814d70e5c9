"""Hospital-node side of fedhosp: the ClientApp, site data readers, local training."""
