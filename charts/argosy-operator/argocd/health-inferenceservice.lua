-- Argo CD health check for serving.argosy.dev/InferenceService.
--   Healthy:     Ready=True and status.observedGeneration == metadata.generation
--   Progressing: the operator has not seen the latest spec yet, Ready is Unknown or absent,
--                or Ready=False for a reason that resolves by itself (download, rollout, ...)
--   Degraded:    Ready=False for any other reason (DownloadFailed, ProgressDeadlineExceeded,
--                InvalidSpec, an autoscaler error ...)
-- Install: argocd-cm key resource.customizations.health.serving.argosy.dev_InferenceService
local hs = {}

-- Ready=False reasons (from argosy.operator.reconcile) that mean "still converging".
local progressing_reasons = {
  Downloading = true,          -- prefetch Job running or waiting for its claim
  WaitingForModel = true,      -- Deployment held back until the model is cached
  Creating = true,             -- child being created
  Updating = true,             -- new pod template being applied
  Progressing = true,          -- Deployment controller has not seen the latest spec
  NoReplicasAvailable = true,  -- pods pulling, scheduling or loading the model
  Pending = true,              -- KEDA / HPA have not reported yet
}

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
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
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
  end
end

if ready == nil or ready.status == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  end
  return hs
end

local message = ready.message
if message == nil or message == "" then
  message = ready.reason or ""
end

if ready.status == "True" then
  hs.status = "Healthy"
  if status.url ~= nil then
    hs.message = "Serving at " .. status.url
  else
    hs.message = message
  end
  return hs
end

if ready.reason ~= nil and progressing_reasons[ready.reason] then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = message
return hs
