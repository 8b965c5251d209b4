"""What a person looks at: the run report page (``make report``), the pipeline's state (``make status``)
and the stage timings both read. Reads the records the stages wrote; trains and tunes nothing."""
