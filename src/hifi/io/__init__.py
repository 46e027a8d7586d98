"""The I/O edge: images and files (:mod:`hifi.io.images`), run folders (:mod:`hifi.io.runs`),
the photos the project draws itself (:mod:`hifi.io.synthetic`), and stock-diffusers inputs
(:mod:`hifi.io.diffusers_compat`)."""
