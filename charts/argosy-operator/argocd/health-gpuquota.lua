-- Argo CD health check for serving.argosy.dev/GPUQuota.
--   Healthy:     status.observedGeneration == metadata.generation, Ready=True, Exceeded not True
--   Progressing: no status yet, or the operator has not seen the latest spec
--   Degraded:    Ready=False, or Exceeded=True (reservations above the quota, e.g. after it shrank)
-- Install: argocd-cm key resource.customizations.health.serving.argosy.dev_GPUQuota
local hs = {}
local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to account the quota"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
local exceeded = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    elseif condition.type == "Exceeded" then
      exceeded = condition
    end
  end
end

if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = ready.message or ready.reason or "Ready is False"
  return hs
end
if exceeded ~= nil and exceeded.status == "True" then
  hs.status = "Degraded"
  hs.message = exceeded.message or exceeded.reason or "reservations exceed the quota"
  return hs
end
if ready == nil or ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

hs.status = "Healthy"
hs.message = tostring(status.gpusReserved or 0) .. " of " .. tostring(obj.spec.gpus) .. " GPUs reserved, "
  .. tostring(status.gpusInUse or 0) .. " in use"
return hs
