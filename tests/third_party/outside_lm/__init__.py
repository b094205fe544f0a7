"""A model package laid out as outside projects lay theirs out: the model file imports its siblings relatively."""
