"""How one trial trains: data, models, attacks, AT methods, energy probes, the engine."""
