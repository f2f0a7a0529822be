"""Device controllers (vbd, tap, tap2, vif) built on L{xenddev.controller}."""
