"""Generation: the sampling settings, the static and continuous samplers, and the helpers they share."""
