"""velodiff model graphs: our own modules with diffusers' parameter names, so diffusers checkpoints load with a
plain ``load_state_dict`` and diffusers is the parity oracle."""
