"""A run on disk: the run directory's layout (:mod:`.layout`), round records (:mod:`.records`),
checkpoints for ``--resume`` (:mod:`.checkpoint`), model files (:mod:`.model_file`,
:mod:`.weights`) and the report (:mod:`.report`)."""
