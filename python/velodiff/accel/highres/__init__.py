"""High-resolution techniques: images larger than the model was trained for, without the duplicated objects and
repeated textures that plain high-resolution sampling gives.

:mod:`.hidiffusion`: HiDiffusion (RAU-Net + MSW-MSA) on UNet pipelines; :mod:`.msw_msa`: its windowed attention;
:mod:`.raunet`: its resolution-aware down / up-sampling schedule.
"""
