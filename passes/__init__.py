"""The compiler: the IR-neutral dataflow graph, analysis passes (classify, propagate) and rewrite passes."""
